"""The ``--spinal-report DIR`` folder: a PNG per gate comparison and ``index.html`` listing every gate.

The process that runs a gate draws its image and adds the image's file name and the layers out
of tolerance to the gate record. Under pytest-xdist that is a worker. The process that prints the
summary, the controller under pytest-xdist, writes the index from those records alone.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from pytest_spinal import __version__
from pytest_spinal.compare import TraceComparison
from pytest_spinal.plots import PLOT_INSTALL_HINT, TRACE_FIGURE_SIZE, DPI, PlottingUnavailable, draw_comparison, require_matplotlib
from pytest_spinal.report import MAX_TABLE_ROWS
from pytest_spinal.summary import worst_columns

logger = logging.getLogger(__name__)

INDEX_NAME = "index.html"

#: ``image_error`` of a gate record whose image was not drawn because matplotlib is missing.
MATPLOTLIB_MISSING = "matplotlib is not installed"

#: Characters of a test id kept in an image file name. A hash of the whole id keeps names unique.
MAX_NAME_CHARS = 80

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.number { text-align: right; font-family: monospace; }
tr.failed td { background: #fde0dc; }
tr.passed td { background: #e6f4ea; }
.hint { background: #fff4ce; border: 1px solid #e0c060; padding: 0.6em 1em; }
section { margin-top: 2em; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
code { background: #f2f2f2; padding: 0 0.2em; }
"""


def image_name(nodeid: str, index: int) -> str:
    """Return the PNG file name of the ``index``-th comparison (from 1) in test ``nodeid``."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid.replace("::", "-")).strip("_.")[:MAX_NAME_CHARS]
    digest = hashlib.sha256(nodeid.encode()).hexdigest()[:8]
    return f"{readable}-{digest}-{index}.png"


def render_gate(directory: Path, nodeid: str, index: int, comparison: TraceComparison) -> dict[str, Any]:
    """Draw a gate comparison's image into ``directory`` and return the fields for its gate record.

    The fields are ``failures`` (the layers out of tolerance, worst first, at most
    ``MAX_TABLE_ROWS``), ``failures_total``, and either ``image`` (a file name in ``directory``)
    or ``image_error`` (why no image was written). A missing matplotlib or an unwritable folder
    leaves the test's outcome unchanged.
    """
    failed = sorted(comparison.failures, key=lambda delta: -delta.excess)
    fields: dict[str, Any] = {
        "failures": [
            {
                "metric": delta.metric,
                "layer": delta.label,
                "baseline": round(delta.baseline, 6),
                "observed": round(delta.observed, 6),
                "allowed": round(delta.allowed, 6),
                "excess": round(delta.excess, 4),
            }
            for delta in failed[:MAX_TABLE_ROWS]
        ],
        "failures_total": len(failed),
    }

    try:
        require_matplotlib()
    except PlottingUnavailable:
        fields["image_error"] = MATPLOTLIB_MISSING
        return fields

    name = image_name(nodeid, index)
    plot = draw_comparison(comparison, title=f"{nodeid}: {comparison.checkpoint} against {comparison.baseline_name}")
    try:
        plot.save(directory / name)
    except OSError as error:
        logger.warning("spinal report: writing the image of %s failed: %s", nodeid, error)
        fields["image_error"] = f"writing {name} failed: {error}"
        return fields
    fields["image"] = name
    return fields


def write_index(directory: Path, gates: list[dict[str, Any]]) -> Path:
    """Write ``directory/index.html`` with the summary table and each gate's image or text table.

    The file is written atomically (temporary file, then rename). Returns its path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ordered = sorted(gates, key=lambda gate: (not gate["verdict"].startswith("failed"), gate["test"]))
    parts = [
        "<!doctype html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><title>pytest-spinal report</title>',
        f"<style>{_STYLE}</style></head>",
        "<body>",
        "<h1>pytest-spinal report</h1>",
        f"<p>{_escape(_count_line(ordered))} Written by pytest-spinal {_escape(__version__)}.</p>",
    ]
    if any(gate.get("image_error") == MATPLOTLIB_MISSING for gate in ordered):
        parts.append(
            '<p class="hint">Images were not drawn because matplotlib is not installed, so this report has '
            f"text tables only. Install it with <code>{_escape(PLOT_INSTALL_HINT)}</code> and rerun the tests.</p>"
        )
    if ordered:
        parts.append(_summary_table(ordered))
        for number, gate in enumerate(ordered, start=1):
            parts.append(_gate_section(number, gate))
    parts.append(
        "<p>Gates whose trace is not comparable with the baseline (other probes, settings, layer count or "
        "model dtype) fail before any comparison, so they have no row here. The test's failure message "
        "names the difference.</p>"
    )
    parts.append("</body></html>\n")

    target = directory / INDEX_NAME
    temporary = target.with_name(f".{INDEX_NAME}.{os.getpid()}.tmp")
    temporary.write_text("\n".join(parts), encoding="utf-8")
    os.replace(temporary, target)
    return target


def _count_line(gates: list[dict[str, Any]]) -> str:
    if not gates:
        return "No gate ran: no test called spinal_baseline.assert_close or assert_trace_close."
    verdicts: dict[str, int] = {}
    for gate in gates:
        verdict = gate["verdict"].split(" ")[0]
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    counts = ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items()))
    noun = "gate" if len(gates) == 1 else "gates"
    return f"{len(gates)} {noun}: {counts}."


def _summary_table(gates: list[dict[str, Any]]) -> str:
    rows = []
    for number, gate in enumerate(gates, start=1):
        worst_layer, worst_ratio = worst_columns(gate)
        cells = [
            f'<td><a href="#gate-{number}">{_escape(gate["test"])}</a></td>',
            f"<td>{_escape(gate['checkpoint'])}</td>",
            f"<td>{_escape(worst_layer)}</td>",
            f'<td class="number">{worst_ratio}</td>',
            f"<td>{_escape(gate['verdict'])}</td>",
        ]
        rows.append(f'<tr class="{_row_class(gate)}">{"".join(cells)}</tr>')
    header = _header_row(("test", "checkpoint", "worst layer", "worst |delta|/allowed", "verdict"))
    return "<table>\n" + header + "\n" + "\n".join(rows) + "\n</table>"


def _gate_section(number: int, gate: dict[str, Any]) -> str:
    lines = [
        f'<section id="gate-{number}">',
        f"<h2>{_escape(gate['test'])}</h2>",
        f"<p>{_escape(gate['checkpoint'])} against {_escape(gate['baseline'])}: <strong>{_escape(gate['verdict'])}</strong></p>",
    ]
    if gate["verdict"].startswith("recorded"):
        lines.append("<p>Recorded as the baseline, so nothing was compared.</p>")
    elif gate.get("image"):
        width, height = (round(inches * DPI) for inches in TRACE_FIGURE_SIZE)
        alt = f"contraction and transport of {gate['checkpoint']} against the baseline, per layer"
        lines.append(
            f'<img src="{quote(gate["image"])}" width="{width}" height="{height}" alt="{_escape(alt)}">'
        )
    elif gate.get("image_error") and gate.get("image_error") != MATPLOTLIB_MISSING:
        lines.append(f"<p>No image: {_escape(gate['image_error'])}</p>")

    failures = gate.get("failures") or []
    if failures:
        lines.append(_failure_table(failures))
        hidden = gate.get("failures_total", len(failures)) - len(failures)
        if hidden > 0:
            lines.append(f"<p>... and {hidden} more layers out of tolerance.</p>")
    elif "failures" in gate:
        lines.append("<p>Every compared layer is within tolerance.</p>")
    lines.append("</section>")
    return "\n".join(lines)


def _failure_table(failures: list[dict[str, Any]]) -> str:
    rows = []
    for row in failures:
        delta = row["observed"] - row["baseline"]
        cells = [
            f"<td>{_escape(row['metric'])}</td>",
            f"<td>{_escape(row['layer'])}</td>",
            f'<td class="number">{row["baseline"]:.4f}</td>',
            f'<td class="number">{row["observed"]:.4f}</td>',
            f'<td class="number">{delta:+.4f}</td>',
            f'<td class="number">{row["allowed"]:.4f}</td>',
            f'<td class="number">{row["excess"]:.1f}x</td>',
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = _header_row(("metric", "layer", "baseline", "observed", "delta", "allowed", "|delta|/allowed"))
    caption = "<caption>Layers out of tolerance, worst first</caption>"
    return "<table>\n" + caption + "\n" + header + "\n" + "\n".join(rows) + "\n</table>"


def _header_row(names: Iterable[str]) -> str:
    return "<tr>" + "".join(f"<th>{_escape(name)}</th>" for name in names) + "</tr>"


def _row_class(gate: dict[str, Any]) -> str:
    verdict = gate["verdict"]
    if verdict == "failed":
        return "failed"
    if verdict == "passed":
        return "passed"
    return "recorded"


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)
