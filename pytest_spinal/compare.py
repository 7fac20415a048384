"""Compare a depth trace with a baseline: comparability first, then per-layer tolerances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from pytest_spinal.errors import SpinalError
from pytest_spinal.tolerance import LayerSelection, Tolerance, select_layers, tolerance_per_layer
from pytest_spinal.trace import DepthTrace

METRICS = ("contraction", "transport")

#: Built-in default tolerances, chosen from the harmless and regression variants of
#: SmolLM2-135M-Instruct that ``benchmarks/gate_variants.py`` traces (table and reasoning in
#: BENCHMARKS.md and the README).
BUILTIN_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType({
    "contraction": Tolerance(atol=0.015, z=2.5),
    "transport": Tolerance(atol=0.015, z=2.5),
})

#: Tolerances used where a comparison names none; the plugin replaces them with its ini settings.
DEFAULT_TOLERANCES: dict[str, Tolerance] = dict(BUILTIN_TOLERANCES)

#: Listeners of finished comparisons, one per active pytest session; the last one is called.
comparison_listeners: list[Callable[[TraceComparison], None]] = []


class TraceMismatch(SpinalError, AssertionError):
    """Two traces cannot be compared: other probes, settings or layer count, or an ``auto``
    tolerance with no fixed part against a baseline without a spread."""


class TraceDrift(AssertionError):
    """A trace left its baseline's tolerance in at least one layer."""


@dataclass(frozen=True)
class LayerDelta:
    """One metric at one layer: baseline, observed value and allowed change.

    For transport, ``layer`` is the destination of the step, so layer l has the transport from
    layer l-1 to layer l and layer 0 has none.
    """

    metric: str
    layer: int
    baseline: float
    observed: float
    allowed: float
    one_sided: bool
    spread: float | None = None

    @property
    def delta(self) -> float:
        return self.observed - self.baseline

    @property
    def harmful(self) -> bool:
        """Whether the change goes the harmful way: contraction down or transport up."""
        return self.delta < 0 if self.metric == "contraction" else self.delta > 0

    @property
    def passed(self) -> bool:
        if self.one_sided and not self.harmful:
            return True
        return abs(self.delta) <= self.allowed

    @property
    def excess(self) -> float:
        """``|delta| / allowed``, or 0 for a harmless change under a one-sided tolerance; above 1 fails."""
        if self.one_sided and not self.harmful:
            return 0.0
        return abs(self.delta) / self.allowed if self.allowed > 0 else math.inf

    @property
    def label(self) -> str:
        return f"{self.layer - 1}->{self.layer}" if self.metric == "transport" else str(self.layer)


@dataclass(frozen=True)
class TraceComparison:
    """Result of comparing an observed trace with a baseline, layer by layer."""

    deltas: tuple[LayerDelta, ...]
    tolerances: dict[str, str]
    baseline_name: str
    checkpoint: str
    notes: tuple[str, ...] = ()

    @property
    def failures(self) -> list[LayerDelta]:
        return [delta for delta in self.deltas if not delta.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> LayerDelta | None:
        """The layer whose change uses the largest share of its allowed change."""
        return max(self.deltas, key=lambda delta: delta.excess, default=None)


def check_comparable(observed: DepthTrace, expected: DepthTrace) -> list[str]:
    """List what makes two traces incomparable; an empty list means they can be compared."""
    differences = []
    if observed.probes.get("fingerprint") != expected.probes.get("fingerprint"):
        differences.append(
            f"probe token ids differ: baseline {_short(expected.probes.get('fingerprint'))} "
            f"({expected.probes.get('prompts')} prompts, {expected.probes.get('tokens')} tokens, "
            f"source {expected.probes.get('source')!r}), trace {_short(observed.probes.get('fingerprint'))} "
            f"({observed.probes.get('prompts')} prompts, {observed.probes.get('tokens')} tokens, "
            f"source {observed.probes.get('source')!r})"
        )
    for name, value in expected.settings.to_json().items():
        other = observed.settings.to_json()[name]
        if other != value:
            differences.append(f"setting {name} differs: baseline {value!r}, trace {other!r}")
    if observed.num_layers != expected.num_layers:
        differences.append(f"layer count differs: baseline {expected.num_layers} layers, trace {observed.num_layers}")
    return differences


def comparison_notes(observed: DepthTrace, expected: DepthTrace) -> list[str]:
    """List differences that do not prevent a comparison but may explain a drift."""
    notes = []
    if observed.checkpoint.get("dtype") != expected.checkpoint.get("dtype"):
        notes.append(
            f"model dtype differs: baseline {expected.checkpoint.get('dtype')}, trace {observed.checkpoint.get('dtype')}"
        )
    if observed.environment.get("device") != expected.environment.get("device"):
        notes.append(f"device differs: baseline {expected.environment.get('device')}, trace {observed.environment.get('device')}")
    return notes


def compare_traces(
    observed: DepthTrace,
    expected: DepthTrace,
    *,
    contraction: Tolerance | Sequence[Tolerance] | None = None,
    transport: Tolerance | Sequence[Tolerance] | None = None,
    layers: LayerSelection = None,
    baseline_name: str = "the expected trace",
    update_hint: str | None = None,
) -> TraceComparison:
    """Compare ``observed`` with ``expected`` per layer.

    Explicit tolerances override the defaults for the layers they cover. ``layers`` limits the
    comparison to some layer numbers (a band name, slice, range or list).

    Raises:
        TraceMismatch: when the traces are not comparable (see :func:`check_comparable`).
    """
    __tracebackhide__ = True
    differences = check_comparable(observed, expected)
    if differences:
        raise TraceMismatch(_mismatch_message(differences, baseline_name, update_hint))

    compared = set(select_layers(layers, expected.num_layers))
    requested = {"contraction": contraction, "transport": transport}
    deltas = []
    descriptions = {}
    notes = comparison_notes(observed, expected)
    auto = []
    for metric in METRICS:
        chosen = _with_default(metric, requested[metric])
        per_layer = tolerance_per_layer(chosen, expected.num_layers)
        descriptions[metric] = "; ".join(_describe(tolerance) for tolerance in chosen)
        deltas.extend(_metric_deltas(metric, observed, expected, per_layer, compared))
        auto += [tolerance for tolerance in chosen if tolerance.z]
    if auto and expected.spread is None:
        if any(not tolerance.fixed for tolerance in auto):
            raise TraceMismatch(_no_spread_message(baseline_name, update_hint))
        notes.append(f"{baseline_name} has no spread, so the auto tolerances used their fixed part only")

    return TraceComparison(
        deltas=tuple(deltas),
        tolerances=descriptions,
        baseline_name=baseline_name,
        checkpoint=str(observed.checkpoint.get("name", "?")),
        notes=tuple(notes),
    )


def assert_trace_close(
    observed: DepthTrace,
    expected: DepthTrace,
    *,
    contraction: Tolerance | Sequence[Tolerance] | None = None,
    transport: Tolerance | Sequence[Tolerance] | None = None,
    layers: LayerSelection = None,
    baseline_name: str = "the expected trace",
    update_hint: str | None = None,
) -> TraceComparison:
    """Fail with a release-manager message when ``observed`` left the tolerance of ``expected``.

    Returns the comparison when every compared layer is within tolerance.

    Raises:
        TraceMismatch: the traces are not comparable (other probes, settings, layers or dtype).
        TraceDrift: at least one layer is out of tolerance.
    """
    __tracebackhide__ = True
    from pytest_spinal.report import format_failure

    comparison = compare_traces(
        observed,
        expected,
        contraction=contraction,
        transport=transport,
        layers=layers,
        baseline_name=baseline_name,
        update_hint=update_hint,
    )
    # Only the innermost pytest session hears of it: pytester runs sessions inside sessions.
    if comparison_listeners:
        comparison_listeners[-1](comparison)
    if not comparison.passed:
        raise TraceDrift(format_failure(comparison, update_hint=update_hint))
    return comparison


def _with_default(metric: str, requested: Tolerance | Sequence[Tolerance] | None) -> list[Tolerance]:
    default = DEFAULT_TOLERANCES[metric]
    if requested is None:
        return [default]
    if isinstance(requested, Tolerance):
        requested = [requested]
    requested = list(requested)
    if any(tolerance.layers is None for tolerance in requested):
        return requested
    return [default, *requested]


def _metric_deltas(
    metric: str, observed: DepthTrace, expected: DepthTrace, per_layer: dict[int, Tolerance], compared: set[int]
) -> list[LayerDelta]:
    deltas = []
    first_layer = 0 if metric == "contraction" else 1
    expected_values = getattr(expected, metric)
    observed_values = getattr(observed, metric)
    spreads = getattr(expected.spread, metric) if expected.spread is not None else [None] * len(expected_values)
    for index, baseline in enumerate(expected_values):
        layer = index + first_layer
        if layer not in compared:
            continue
        tolerance = per_layer[layer]
        deltas.append(
            LayerDelta(
                metric=metric,
                layer=layer,
                baseline=baseline,
                observed=observed_values[index],
                allowed=tolerance.allowed(baseline, spreads[index]),
                one_sided=tolerance.one_sided,
                spread=spreads[index],
            )
        )
    return deltas


def _describe(tolerance: Tolerance) -> str:
    scope = "" if tolerance.layers is None else f" on layers {tolerance.layers!r}"
    return tolerance.describe() + scope


def _no_spread_message(baseline_name: str, update_hint: str | None) -> str:
    return (
        f"{baseline_name} has no spread, so a tolerance made only of z x spread cannot be applied. "
        f"Re-record the baseline with this pytest-spinal ({update_hint or 'pytest --spinal-update'}) and "
        f"a probe set of at least 8 prompts, or give the tolerance a fixed part (atol or rtol) as a floor."
    )


def _mismatch_message(differences: list[str], baseline_name: str, update_hint: str | None) -> str:
    lines = [f"{baseline_name} is not comparable with this trace, so no drift was measured:"]
    lines += [f"  - {difference}" for difference in differences]
    lines.append(
        "Trace with the baseline's probes and settings, or re-record the baseline if the change "
        f"of probes or settings is intended: {update_hint or 'pytest --spinal-update'}"
    )
    return "\n".join(lines)


def _short(fingerprint: Any) -> str:
    text = str(fingerprint)
    return text[:19] + "..." if len(text) > 19 else text
