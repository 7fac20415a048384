"""Auto tolerances: ``max(atol + rtol * |baseline|, z * spread)`` from the baseline's measured noise."""

from __future__ import annotations

import pytest

from pytest_spinal import Tolerance, assert_trace_close, compare_traces
from pytest_spinal.compare import TraceDrift, TraceMismatch

CONTRACTION = (1.0, 0.9, 0.8, 0.7, 0.6)
TRANSPORT = (0.5, 0.4, 0.3, 0.2)
# Layer 4 of the transport is noisy (0.05), every other layer quiet (0.001).
SPREAD = ((0.001,) * 5, (0.001, 0.001, 0.001, 0.05))
LOOSE = Tolerance(atol=1.0)


@pytest.fixture
def baseline(synthetic_trace):
    return synthetic_trace(CONTRACTION, TRANSPORT, spread=SPREAD)


def moved_transport(synthetic_trace, layer: int, delta: float):
    transport = list(TRANSPORT)
    transport[layer - 1] += delta
    return synthetic_trace(CONTRACTION, transport)


def test_allowed_takes_larger_of_floor_and_spread():
    tolerance = Tolerance(atol=0.01, rtol=0.1, z=4)

    assert tolerance.allowed(2.0, spread=0.001) == pytest.approx(0.21)
    assert tolerance.allowed(2.0, spread=0.1) == pytest.approx(0.4)
    assert tolerance.allowed(2.0) == pytest.approx(0.21)


def test_z_ignored_without_z():
    assert Tolerance(atol=0.01).allowed(1.0, spread=5.0) == pytest.approx(0.01)


def test_noisy_layer_allows_more(synthetic_trace, baseline):
    # 0.1 is within 4 x 0.05 at the noisy layer 4, but far beyond 4 x 0.001 at the quiet layer 2.
    auto = Tolerance(atol=0.005, z=4)

    assert_trace_close(moved_transport(synthetic_trace, 4, 0.1), baseline, contraction=LOOSE, transport=auto)
    with pytest.raises(TraceDrift, match=r"transport rose in layer 2 "):
        assert_trace_close(moved_transport(synthetic_trace, 2, 0.1), baseline, contraction=LOOSE, transport=auto)


def test_floor_applies_where_spread_is_small(synthetic_trace, baseline):
    # 4 x 0.001 would reject a change of 0.01; the floor of 0.02 allows it.
    comparison = assert_trace_close(
        moved_transport(synthetic_trace, 2, 0.01), baseline, contraction=LOOSE, transport=Tolerance(atol=0.02, z=4)
    )

    layer_2 = next(delta for delta in comparison.deltas if delta.metric == "transport" and delta.layer == 2)
    assert layer_2.allowed == pytest.approx(0.02)
    assert layer_2.spread == pytest.approx(0.001)


def test_description_names_both_parts(synthetic_trace, baseline):
    comparison = compare_traces(baseline, baseline, contraction=Tolerance(z=3), transport=Tolerance(atol=0.02, rtol=0.03, z=4))

    assert comparison.tolerances == {"contraction": "3 x spread", "transport": "max(atol 0.02 + rtol 0.03, 4 x spread)"}


def test_floor_only_against_baseline_without_spread(synthetic_trace):
    baseline = synthetic_trace(CONTRACTION, TRANSPORT)

    with pytest.raises(TraceDrift) as raised:
        assert_trace_close(
            moved_transport(synthetic_trace, 4, 0.1), baseline, contraction=LOOSE, transport=Tolerance(atol=0.005, z=4),
            baseline_name="old.json",
        )

    assert "Note: old.json has no spread, so the auto tolerances used their fixed part only" in str(raised.value)


def test_spread_only_tolerance_needs_spread(synthetic_trace):
    baseline = synthetic_trace(CONTRACTION, TRANSPORT)

    with pytest.raises(TraceMismatch) as raised:
        assert_trace_close(baseline, baseline, transport=Tolerance(z=4), baseline_name="old.json")

    message = str(raised.value)
    assert message.startswith("old.json has no spread, so a tolerance made only of z x spread cannot be applied.")
    assert "or give the tolerance a fixed part (atol or rtol) as a floor" in message


@pytest.mark.parametrize("z", [-1.0, float("inf"), float("nan"), True])
def test_invalid_z_rejected(z):
    with pytest.raises(ValueError, match=r"Tolerance z=.* is invalid; it must be a finite number >= 0, e.g. z=4"):
        Tolerance(atol=0.01, z=z)


def test_nothing_allowed_rejected():
    with pytest.raises(ValueError, match="give atol, rtol or z > 0"):
        Tolerance()


GATE_MODULE = """
from pytest_spinal import DepthTrace, TraceSettings, TraceSpread


def test_gate(spinal_baseline):
    import os

    last = float(os.environ["LAST_TRANSPORT"])
    trace = DepthTrace(
        contraction=(1.0, 0.9, 0.8, 0.7, 0.6),
        transport=(0.5, 0.4, 0.3, last),
        transport_per_prompt=((0.5, 0.4, 0.3, last),),
        settings=TraceSettings(),
        probes={"fingerprint": "sha256:0"},
        checkpoint={"name": "synthetic", "dtype": "float32"},
        environment={},
        spread=TraceSpread((0.001,) * 5, (0.001, 0.001, 0.001, 0.05), resamples=32, seed=0),
    )
    spinal_baseline.assert_close(trace)
"""


@pytest.mark.parametrize(("z", "outcome"), [("0", "failed"), ("4", "passed")])
def test_ini_z_turns_auto_on(project, monkeypatch, z, outcome):
    project.makepyfile(test_gate=GATE_MODULE)
    monkeypatch.setenv("LAST_TRANSPORT", "0.2")
    project.runpytest("--spinal-update").assert_outcomes(passed=1)
    monkeypatch.setenv("LAST_TRANSPORT", "0.3")

    result = project.runpytest("-o", "spinal_transport_atol=0.01", "-o", "spinal_transport_rtol=0", "-o", f"spinal_transport_z={z}")

    result.assert_outcomes(**{outcome: 1})


def test_ini_all_zero_rejected(project):
    project.makepyfile(test_gate=GATE_MODULE)

    result = project.runpytest("-o", "spinal_contraction_atol=0", "-o", "spinal_contraction_rtol=0", "-o", "spinal_contraction_z=0")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the spinal_contraction_* ini settings are invalid: Tolerance(atol=0, rtol=0, z=0) allows no change at all*"])


def test_layer_list_tolerance_without_spread(synthetic_trace):
    # A list of layers makes a Tolerance unhashable; the spread check must still work.
    baseline = synthetic_trace(CONTRACTION, TRANSPORT)

    with pytest.raises(TraceMismatch, match="has no spread"):
        compare_traces(baseline, baseline, transport=[Tolerance(atol=0.01), Tolerance(z=4, layers=[3, 4])])
