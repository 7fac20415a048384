"""Render comparisons as failure messages and gate summaries."""

from __future__ import annotations

import statistics
from typing import Iterable

from pytest_spinal.compare import METRICS, LayerDelta, TraceComparison

#: Rows of the per-layer table in a failure message; the rest are counted, not listed.
MAX_TABLE_ROWS = 15


def format_failure(comparison: TraceComparison, *, update_hint: str | None = None) -> str:
    """Render a failed comparison: headline, statistics, capped table, then how to re-record."""
    from tabulate import tabulate

    failures = comparison.failures
    shown = sorted(sorted(failures, key=lambda delta: -delta.excess)[:MAX_TABLE_ROWS], key=lambda delta: (delta.metric, delta.layer))
    rows = [
        (delta.metric, delta.label, delta.baseline, delta.observed, delta.delta, delta.allowed, f"{delta.excess:.1f}x")
        for delta in shown
    ]
    table = tabulate(
        rows,
        headers=("metric", "layer", "baseline", "observed", "delta", "allowed", "|delta|/allowed"),
        floatfmt=("", "", ".4f", ".4f", "+.4f", ".4f", ""),
    )

    lines = [headline(comparison), "", _statistics(comparison), "", table]
    if len(failures) > len(shown):
        lines.append(f"... and {len(failures) - len(shown)} more out of tolerance")
    lines.append("")
    lines.append("Tolerances: " + "; ".join(f"{metric} {comparison.tolerances[metric]}" for metric in METRICS))
    lines += [f"Note: {note}" for note in comparison.notes]
    lines.append(
        "If this change is intended, re-record the baseline: "
        + (update_hint or "rerun the test with pytest --spinal-update")
    )
    return "\n".join(lines)


def headline(comparison: TraceComparison) -> str:
    """Return one line naming which metric moved, in which layers, by how much, against what."""
    parts = []
    for metric in METRICS:
        failed = [delta for delta in comparison.failures if delta.metric == metric]
        if not failed:
            continue
        worst = max(failed, key=lambda delta: delta.excess)
        parts.append(
            f"{metric} {_direction(failed)} in {_layer_word(failed)} {format_layers(delta.layer for delta in failed)} "
            f"(worst {worst.label}: {worst.baseline:.4f} -> {worst.observed:.4f}, "
            f"|delta| {abs(worst.delta):.4f} > allowed {worst.allowed:.4f})"
        )
    return f"depth trace of {comparison.checkpoint} is out of tolerance against {comparison.baseline_name}: " + "; ".join(parts)


def format_layers(layers: Iterable[int]) -> str:
    """Compress layer numbers into ranges: ``[1, 2, 3, 7]`` becomes ``1-3, 7``."""
    ordered = sorted(set(layers))
    ranges: list[list[int]] = []
    for layer in ordered:
        if ranges and layer == ranges[-1][1] + 1:
            ranges[-1][1] = layer
        else:
            ranges.append([layer, layer])
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def _layer_word(failed: list[LayerDelta]) -> str:
    return "layer" if len(failed) == 1 else "layers"


def _direction(failed: list[LayerDelta]) -> str:
    if all(delta.delta > 0 for delta in failed):
        return "rose"
    if all(delta.delta < 0 for delta in failed):
        return "fell"
    return "moved"


def _statistics(comparison: TraceComparison) -> str:
    lines = []
    for metric in METRICS:
        deltas = [delta for delta in comparison.deltas if delta.metric == metric]
        if not deltas:
            continue
        absolute = [abs(delta.delta) for delta in deltas]
        relative = [abs(delta.delta) / abs(delta.baseline) for delta in deltas if delta.baseline != 0]
        failed = sum(not delta.passed for delta in deltas)
        line = (
            f"{metric}: {failed} of {len(deltas)} layers out of tolerance; |delta| max {max(absolute):.4f}, "
            f"mean {statistics.fmean(absolute):.4f}, median {statistics.median(absolute):.4f}"
        )
        if relative:
            line += f"; relative max {max(relative):.2%}"
        lines.append(line)
    return "\n".join(lines)
