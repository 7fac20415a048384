"""The terminal summary block of pytest-spinal, and pruning of unused baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_spinal.baselines import ci_is_set
from pytest_spinal.session import SpinalSession

#: Gate rows printed in the summary; failed gates come first.
MAX_SUMMARY_ROWS = 30


def plural(count: int, word: str) -> str:
    """Return ``"1 gate"`` or ``"3 gates"``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def write_summary(reporter: Any, config: pytest.Config, session: SpinalSession) -> None:
    """Write the spinal block: gates, baselines written, traces computed, unused baselines."""
    lines = _gate_lines(session) + _baseline_lines(session) + _trace_lines(session)
    lines += _unused_lines(reporter, config, session)
    if session.report_line is not None:
        lines.append(session.report_line)
    if not lines:
        return
    reporter.write_sep("=", "spinal")
    for line in lines:
        reporter.write_line(line)


def _gate_lines(session: SpinalSession) -> list[str]:
    from tabulate import tabulate

    gates = session.gates
    if not gates:
        return []
    verdicts: dict[str, int] = {}
    for gate in gates:
        verdict = gate["verdict"].split(" ")[0]
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    counts = ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items()))

    ordered = sorted(gates, key=lambda gate: (not gate["verdict"].startswith("failed"), gate["test"]))
    rows = [(gate["test"], gate["checkpoint"], *worst_columns(gate), gate["verdict"]) for gate in ordered[:MAX_SUMMARY_ROWS]]
    table = tabulate(
        rows, headers=("test", "checkpoint", "worst layer", "worst |delta|/allowed", "verdict"), disable_numparse=True
    )
    lines = [f"{plural(len(gates), 'gate')}: {counts}", *table.splitlines()]
    if len(gates) > MAX_SUMMARY_ROWS:
        lines.append(f"... and {len(gates) - MAX_SUMMARY_ROWS} more gates")
    # Notes (another model dtype or device than the baseline's) matter most on gates that passed.
    notes = sorted({note for gate in gates for note in gate.get("notes", [])})
    lines += [f"note: {note}" for note in notes]
    return lines


def _baseline_lines(session: SpinalSession) -> list[str]:
    if not session.update:
        return []
    written = session.baseline_actions["written"]
    unchanged = session.baseline_actions["unchanged"]
    return [f"baselines: {written} written, {unchanged} unchanged in {session.store.root}"]


def _trace_lines(session: SpinalSession) -> list[str]:
    computed = session.trace_events["computed"]
    cached = session.trace_events["cached"]
    if not computed and not cached:
        return []
    return [f"traces: {computed} computed, {cached} served from the session cache"]


def _unused_lines(reporter: Any, config: pytest.Config, session: SpinalSession) -> list[str]:
    reason = _partial_run_reason(reporter, config, session)
    if reason is not None:
        if config.option.spinal_prune:
            return [f"--spinal-prune did nothing: {reason}; unused baselines are only known after a full, passing run"]
        return []

    used = session.baselines_used
    unused = [path for path in session.store.all_files() if str(path.resolve()) not in used]
    if not unused:
        return []

    lines = [f"{plural(len(unused), 'baseline')} not used by any test:"]
    lines += [f"  {_relative(path, config.rootpath)}" for path in unused]
    if not config.option.spinal_prune:
        lines.append("delete them with --spinal-prune")
    elif ci_is_set():
        lines.append("--spinal-prune did nothing: files are never deleted while the CI environment variable is set")
    else:
        for path in unused:
            path.unlink()
        lines.append(f"deleted {plural(len(unused), 'unused baseline')}")
    return lines


def _partial_run_reason(reporter: Any, config: pytest.Config, session: SpinalSession) -> str | None:
    """Explain why this run may not have used every baseline, or return ``None`` for a full run."""
    option = config.option
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        return "test paths were given on the command line"
    if getattr(option, "keyword", ""):
        return "tests were selected with -k"
    if getattr(option, "markexpr", ""):
        return "tests were selected with -m"
    if getattr(option, "deselect", None) or session.deselected:
        return "some tests were deselected"
    if getattr(option, "lf", False):
        return "only last-failed tests ran"
    if reporter.stats.get("failed") or reporter.stats.get("error"):
        return "some tests failed or errored"
    if reporter.stats.get("skipped"):
        # A skipped gate never requests its baseline, which would then look unused.
        return "some tests were skipped"
    if not session.gates and not session.baselines_used:
        return "no gate ran"
    return None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def worst_columns(gate: dict) -> tuple[str, str]:
    """Return a gate's worst layer and its |delta|/allowed ratio as summaries show them.

    No layer is named where nothing moved (the ratio shows as 0.00), and both are "-" where nothing was compared.
    """
    if not gate["worst_layer"]:
        return "-", "-"
    ratio = f"{gate['worst_excess']:.2f}"
    return ("-" if ratio == "0.00" else gate["worst_layer"]), ratio
