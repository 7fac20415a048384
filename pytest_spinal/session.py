"""State of one pytest session: cached traces, the baseline store, and what the gates did.

Everything a test reports (gates, baselines used or written, traces computed) travels as
``user_properties`` on its reports, so the same records reach JUnit XML and, under
pytest-xdist, the controller process that prints the summary.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pytest_spinal.baselines import BaselineStore, name_for_node
from pytest_spinal.compare import TraceComparison, assert_trace_close
from pytest_spinal.tolerance import LayerSelection, Tolerance
from pytest_spinal.trace import DepthTrace, TraceSettings

if TYPE_CHECKING:
    import pytest

logger = logging.getLogger(__name__)

GATE_PROPERTY = "spinal_gate"
BASELINE_PROPERTY = "spinal_baseline"
TRACE_PROPERTY = "spinal_trace"


@dataclass
class SpinalSession:
    """Settings and caches of the pytest-spinal plugin for one session (or one xdist worker)."""

    store: BaselineStore
    update: bool
    device: str
    dtype: str
    probes: str
    rootpath: Path
    device_map: str | None = None
    traces: dict[tuple, DepthTrace] = field(default_factory=dict)
    current_item: Any = None
    previous_tolerances: dict[str, Tolerance] = field(default_factory=dict)
    # Folder of --spinal-report, and the summary line saying where its index.html went.
    report_dir: Path | None = None
    report_line: str | None = None

    # Gathered from test reports; complete only in the process that prints the summary.
    gates: list[dict[str, Any]] = field(default_factory=list)
    baselines_used: set[str] = field(default_factory=set)
    baseline_actions: Counter = field(default_factory=Counter)
    trace_events: Counter = field(default_factory=Counter)
    deselected: int = 0

    def record(self, name: str, value: dict[str, Any]) -> None:
        """Attach a record to the running test's report (and so to JUnit XML)."""
        if self.current_item is not None:
            self.current_item.user_properties.append((name, json.dumps(value, sort_keys=True)))

    def on_comparison(self, comparison: TraceComparison) -> None:
        worst = comparison.worst
        record = {
            "checkpoint": comparison.checkpoint,
            "baseline": comparison.baseline_name,
            "worst_layer": f"{worst.metric} {worst.label}" if worst else "",
            "worst_excess": round(worst.excess, 4) if worst else 0.0,
            "verdict": "passed" if comparison.passed else "failed",
        }
        if comparison.notes:
            record["notes"] = list(comparison.notes)
        if self.report_dir is not None and self.current_item is not None:
            from pytest_spinal.html_report import render_gate

            nodeid = self.current_item.nodeid
            self._comparisons_per_test[nodeid] += 1
            record.update(render_gate(self.report_dir, nodeid, self._comparisons_per_test[nodeid], comparison))
        self.record(GATE_PROPERTY, record)

    def collect(self, report: pytest.TestReport) -> None:
        """Fold one report's records into the session totals (deduplicated across phases)."""
        for name, value in report.user_properties:
            if name not in (GATE_PROPERTY, BASELINE_PROPERTY, TRACE_PROPERTY):
                continue
            record = json.loads(value)
            key = (report.nodeid, name, value)
            if key in self._seen:
                continue
            self._seen.add(key)
            if name == GATE_PROPERTY:
                self.gates.append({"test": report.nodeid, **record})
            elif name == BASELINE_PROPERTY:
                self.baselines_used.add(record["path"])
                if record["action"] in ("written", "unchanged"):
                    self.baseline_actions[record["action"]] += 1
            else:
                self.trace_events[record["event"]] += 1

    def __post_init__(self) -> None:
        self._seen: set[tuple] = set()
        self._comparisons_per_test: Counter = Counter()


class TraceFactory:
    """The ``spinal_trace`` fixture: trace a checkpoint once per session and settings."""

    def __init__(self, session: SpinalSession) -> None:
        self._session = session
        self.computed = 0
        self.requested = 0

    def __call__(
        self,
        checkpoint: Any,
        *,
        probes: Any = None,
        settings: TraceSettings | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 8,
        chunk_size: int = 256,
        chat_template: bool = True,
        device_map: str | None = None,
    ) -> DepthTrace:
        """Return the depth trace of ``checkpoint``, computing it only on the first request."""
        from pytest_spinal.checkpoints import resolve_device
        from pytest_spinal.probes import load_probes
        from pytest_spinal.tracing import trace_checkpoint

        session = self._session
        checkpoint = self._resolve_path(checkpoint)
        probe_set = load_probes(probes if probes is not None else session.probes)
        settings = settings or TraceSettings()
        dtype = dtype or session.dtype
        device = resolve_device(device or session.device)
        device_map = device_map or session.device_map
        key = (_checkpoint_key(checkpoint), probe_set, chat_template, settings, dtype, device, device_map, batch_size, chunk_size)

        self.requested += 1
        trace = session.traces.get(key)
        if trace is None:
            logger.info("tracing %s on %s in %s", checkpoint, device, dtype)
            trace = trace_checkpoint(
                checkpoint,
                probes=probe_set,
                settings=settings,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                chunk_size=chunk_size,
                chat_template=chat_template,
                device_map=device_map,
                # Only a trace that may be written as a baseline needs the spread (it costs resampling).
                spread=session.update,
            )
            session.traces[key] = trace
            self.computed += 1
            session.record(TRACE_PROPERTY, {"event": "computed"})
        else:
            session.record(TRACE_PROPERTY, {"event": "cached"})
        return trace

    def _resolve_path(self, checkpoint: Any) -> Any:
        if not isinstance(checkpoint, (str, os.PathLike)):
            return checkpoint
        text = os.fspath(checkpoint)
        candidate = self._session.rootpath / text
        if not Path(text).is_absolute() and not Path(text).exists() and candidate.exists():
            return str(candidate)
        return text


class GateBaseline:
    """The ``spinal_baseline`` fixture: compare a trace with this test's baseline, or record it."""

    def __init__(self, session: SpinalSession, nodeid: str) -> None:
        self._session = session
        self._nodeid = nodeid
        self.name = name_for_node(nodeid)

    @property
    def path(self) -> Path:
        """File of this test's default baseline."""
        return self._session.store.path_for(self.name)

    def assert_close(
        self,
        trace: DepthTrace,
        *,
        name: str | None = None,
        contraction: Tolerance | Sequence[Tolerance] | None = None,
        transport: Tolerance | Sequence[Tolerance] | None = None,
        layers: LayerSelection = None,
    ) -> TraceComparison | None:
        """Compare ``trace`` with the baseline ``name`` (default: named after the test).

        Under ``--spinal-update`` the trace is recorded instead and the gate passes. Returns the
        comparison, or ``None`` when recording.
        """
        __tracebackhide__ = True
        session = self._session
        path = session.store.path_for(name or self.name)
        record_command = f"pytest --spinal-update {_quote(self._nodeid)}"
        update_hint = f"{record_command}, with this run's other options"
        if name is not None:
            update_hint += f" (every test that names baseline {name!r} then compares with the new file)"
        label = _display_path(path, session.rootpath)

        if session.update:
            action = session.store.write(path, trace)
            session.record(BASELINE_PROPERTY, {"path": str(path.resolve()), "action": action})
            self._record_unmeasured_gate(trace, label, verdict=f"recorded ({action})")
            return None

        session.record(BASELINE_PROPERTY, {"path": str(path.resolve()), "action": "compared"})
        if not path.exists():
            self._record_unmeasured_gate(trace, label, verdict="failed (no baseline)")
        expected = session.store.read(path, update_hint=record_command)
        return assert_trace_close(
            trace,
            expected,
            contraction=contraction,
            transport=transport,
            layers=layers,
            baseline_name=label,
            update_hint=update_hint,
        )


    def _record_unmeasured_gate(self, trace: DepthTrace, label: str, *, verdict: str) -> None:
        """Record a gate that compared nothing: its baseline was just recorded, or is missing."""
        self._session.record(
            GATE_PROPERTY,
            {"checkpoint": trace.checkpoint.get("name", "?"), "baseline": label, "worst_layer": "", "worst_excess": 0.0, "verdict": verdict},
        )


def _checkpoint_key(checkpoint: Any) -> Any:
    from pytest_spinal.checkpoints import LoadedCheckpoint, locate_checkpoint

    if isinstance(checkpoint, LoadedCheckpoint):
        return ("loaded", checkpoint.fingerprint)
    if isinstance(checkpoint, tuple):
        return ("objects", id(checkpoint[0]))
    files = locate_checkpoint(checkpoint)
    if files is None:
        return ("hub", os.fspath(checkpoint))
    return ("files", os.fspath(checkpoint), files.fingerprint)


def _display_path(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _quote(nodeid: str) -> str:
    return f"'{nodeid}'" if any(char in nodeid for char in " []()'\"$") else nodeid
