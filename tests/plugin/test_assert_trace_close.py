"""``assert_trace_close``: tolerances per metric and layer band, one-sided gates, the failure message."""

from __future__ import annotations

import re

import pytest

from pytest_spinal import Tolerance, assert_trace_close, compare_traces
from pytest_spinal.compare import TraceDrift
from pytest_spinal.report import MAX_TABLE_ROWS

CONTRACTION = (1.0, 0.9, 0.8, 0.7, 0.6)
TRANSPORT = (0.5, 0.4, 0.3, 0.2)

#: Wide enough that a metric which a test leaves unchanged never fails.
LOOSE = Tolerance(atol=1.0)


def shifted(values, index, delta):
    """Return ``values`` with ``delta`` added to the value at ``index``."""
    result = list(values)
    result[index] += delta
    return tuple(result)


@pytest.fixture
def baseline(synthetic_trace):
    return synthetic_trace(CONTRACTION, TRANSPORT)


def test_contraction_within_atol_passes(synthetic_trace, baseline):
    observed = synthetic_trace(shifted(CONTRACTION, 2, 0.015), TRANSPORT)

    comparison = assert_trace_close(observed, baseline, contraction=Tolerance(atol=0.02), transport=LOOSE)

    assert comparison.passed


def test_contraction_beyond_atol_fails(synthetic_trace, baseline):
    observed = synthetic_trace(shifted(CONTRACTION, 2, 0.025), TRANSPORT)

    with pytest.raises(TraceDrift, match="contraction rose in layer 2 "):
        assert_trace_close(observed, baseline, contraction=Tolerance(atol=0.02), transport=LOOSE)


def test_transport_within_rtol_passes(synthetic_trace, baseline):
    # Transport 0->1 has baseline 0.5, so rtol 0.1 allows a change of 0.05.
    observed = synthetic_trace(CONTRACTION, shifted(TRANSPORT, 0, 0.04))

    comparison = assert_trace_close(observed, baseline, contraction=LOOSE, transport=Tolerance(rtol=0.1))

    assert comparison.passed


def test_transport_beyond_rtol_fails(synthetic_trace, baseline):
    observed = synthetic_trace(CONTRACTION, shifted(TRANSPORT, 0, 0.06))

    with pytest.raises(TraceDrift, match=r"transport rose in layer 1 \(worst 0->1: "):
        assert_trace_close(observed, baseline, contraction=LOOSE, transport=Tolerance(rtol=0.1))


def test_allowed_change_adds_atol_and_rtol(baseline):
    comparison = compare_traces(baseline, baseline, contraction=Tolerance(atol=0.01, rtol=0.1), transport=LOOSE)

    allowed = {delta.layer: delta.allowed for delta in comparison.deltas if delta.metric == "contraction"}
    assert allowed == pytest.approx({layer: 0.01 + 0.1 * value for layer, value in enumerate(CONTRACTION)})


def test_late_band_tightens_last_layer(synthetic_trace, baseline):
    # With 4 layers the bands are early = [1], middle = [2, 3] and late = [4].
    banded = [Tolerance(atol=0.5), Tolerance(atol=0.01, layers="late")]
    middle_moved = synthetic_trace(shifted(CONTRACTION, 2, 0.1), TRANSPORT)
    last_moved = synthetic_trace(shifted(CONTRACTION, 4, 0.1), TRANSPORT)

    assert assert_trace_close(middle_moved, baseline, contraction=banded, transport=LOOSE).passed
    with pytest.raises(TraceDrift, match="contraction rose in layer 4 "):
        assert_trace_close(last_moved, baseline, contraction=banded, transport=LOOSE)


def test_band_tolerance_keeps_default_elsewhere(synthetic_trace, baseline):
    # A tolerance limited to a band leaves the other layers on the default tolerance.
    observed = synthetic_trace(shifted(CONTRACTION, 1, 0.5), TRANSPORT)

    with pytest.raises(TraceDrift, match="contraction rose in layer 1 "):
        assert_trace_close(observed, baseline, contraction=Tolerance(atol=1.0, layers="late"), transport=LOOSE)


def test_layer_slice_skips_early_layers(synthetic_trace, baseline):
    observed = synthetic_trace(shifted(CONTRACTION, 1, 1.0), shifted(TRANSPORT, 0, 1.0))

    comparison = assert_trace_close(observed, baseline, layers=slice(-2, None))

    assert comparison.passed
    assert sorted((delta.metric, delta.layer) for delta in comparison.deltas) == [
        ("contraction", 3),
        ("contraction", 4),
        ("transport", 3),
        ("transport", 4),
    ]


def test_layer_slice_still_gates_last_layers(synthetic_trace, baseline):
    observed = synthetic_trace(CONTRACTION, shifted(TRANSPORT, 3, 0.5))

    with pytest.raises(TraceDrift, match=r"transport rose in layer 4 \(worst 3->4: "):
        assert_trace_close(observed, baseline, layers=slice(-2, None))


@pytest.mark.parametrize(
    ("metric", "delta"),
    [("contraction", +0.5), ("transport", -0.15)],
    ids=["contraction-rises", "transport-falls"],
)
def test_one_sided_allows_harmless_change(synthetic_trace, baseline, metric, delta):
    profiles = {"contraction": CONTRACTION, "transport": TRANSPORT}
    profiles[metric] = shifted(profiles[metric], 3, delta)
    one_sided = Tolerance(atol=0.01, one_sided=True)

    comparison = assert_trace_close(
        synthetic_trace(profiles["contraction"], profiles["transport"]), baseline, contraction=one_sided, transport=one_sided
    )

    assert comparison.passed


@pytest.mark.parametrize(
    ("metric", "delta", "headline"),
    [("contraction", -0.05, "contraction fell in layer 3 "), ("transport", +0.05, "transport rose in layer 4 ")],
    ids=["contraction-falls", "transport-rises"],
)
def test_one_sided_rejects_harmful_change(synthetic_trace, baseline, metric, delta, headline):
    profiles = {"contraction": CONTRACTION, "transport": TRANSPORT}
    profiles[metric] = shifted(profiles[metric], 3, delta)
    one_sided = Tolerance(atol=0.01, one_sided=True)

    with pytest.raises(TraceDrift, match=headline):
        assert_trace_close(
            synthetic_trace(profiles["contraction"], profiles["transport"]),
            baseline,
            contraction=one_sided,
            transport=one_sided,
        )


def test_message_order_headline_table_hint(synthetic_trace, baseline):
    observed = synthetic_trace(CONTRACTION, shifted(TRANSPORT, 3, 0.5))

    with pytest.raises(TraceDrift) as raised:
        assert_trace_close(observed, baseline, update_hint="pytest --spinal-update test_gate.py::test_release")

    lines = str(raised.value).splitlines()
    table_header = next(index for index, line in enumerate(lines) if line.startswith("metric "))
    assert lines[0].startswith("depth trace of synthetic is out of tolerance against the expected trace: transport rose")
    assert table_header > 0
    assert lines[table_header + 2].startswith("transport  3->4")
    assert lines[-1] == "If this change is intended, re-record the baseline: pytest --spinal-update test_gate.py::test_release"


def test_message_without_hint_names_option(synthetic_trace, baseline):
    observed = synthetic_trace(CONTRACTION, shifted(TRANSPORT, 3, 0.5))

    with pytest.raises(TraceDrift) as raised:
        assert_trace_close(observed, baseline)

    assert str(raised.value).splitlines()[-1].endswith("rerun the test with pytest --spinal-update")


def test_table_capped_at_worst_rows(synthetic_trace):
    layers = 40
    contraction = tuple(1.0 for _ in range(layers + 1))
    transport = tuple(0.5 for _ in range(layers))
    # Layer l moves by 0.1 + 0.01 * l, so the last layers are the worst.
    drifted = tuple(value + 0.1 + 0.01 * layer for layer, value in enumerate(contraction))

    with pytest.raises(TraceDrift) as raised:
        assert_trace_close(synthetic_trace(drifted, transport), synthetic_trace(contraction, transport))

    message = str(raised.value)
    rows = re.findall(r"^contraction +(\d+) ", message, flags=re.MULTILINE)
    assert len(rows) == MAX_TABLE_ROWS
    assert [int(layer) for layer in rows] == list(range(layers + 1 - MAX_TABLE_ROWS, layers + 1))
    assert f"... and {layers + 1 - MAX_TABLE_ROWS} more out of tolerance" in message


SYNTHETIC_MODULE = """
import os

from pytest_spinal import DepthTrace, TraceSettings, assert_trace_close


def make_trace(last_transport, tail_window=(0.5, 0.9)):
    return DepthTrace(
        contraction=(1.0, 0.9, 0.8, 0.7, 0.6),
        transport=(0.5, 0.4, 0.3, last_transport),
        transport_per_prompt=((0.5, 0.4, 0.3, last_transport),),
        settings=TraceSettings(tail_window=tail_window),
        probes={"fingerprint": "sha256:0"},
        checkpoint={"name": "synthetic", "dtype": "float32"},
        environment={},
    )


def test_direct_call():
    assert_trace_close(make_trace(0.9), make_trace(0.2))


def test_baseline_fixture(spinal_baseline):
    spinal_baseline.assert_close(make_trace(float(os.environ["LAST_TRANSPORT"])))


def test_mismatch(spinal_baseline):
    spinal_baseline.assert_close(make_trace(0.2, tail_window=(0.4, 0.9)), name="test_synthetic/test_baseline_fixture")
"""


def test_failure_hides_plugin_frames(project, monkeypatch):
    project.makepyfile(test_synthetic=SYNTHETIC_MODULE)
    monkeypatch.setenv("LAST_TRANSPORT", "0.2")
    project.runpytest("--spinal-update", "-k", "baseline_fixture").assert_outcomes(passed=1, deselected=2)
    monkeypatch.setenv("LAST_TRANSPORT", "0.9")

    result = project.runpytest("--tb=long", "-k", "not mismatch")

    result.assert_outcomes(failed=2, deselected=1)
    output = result.stdout.str()
    assert ">       assert_trace_close(make_trace(0.9), make_trace(0.2))" in output
    assert '>       spinal_baseline.assert_close(make_trace(float(os.environ["LAST_TRANSPORT"])))' in output
    assert "compare.py" not in output
    assert "session.py" not in output


def test_missing_baseline_hides_plugin_frames(project, monkeypatch):
    project.makepyfile(test_synthetic=SYNTHETIC_MODULE)
    monkeypatch.setenv("LAST_TRANSPORT", "0.2")

    result = project.runpytest("--tb=long", "-k", "baseline_fixture")

    result.assert_outcomes(failed=1, deselected=2)
    output = result.stdout.str()
    assert "no baseline at" in output
    assert "session.py" not in output
    assert "baselines.py" not in output


def test_mismatch_hides_plugin_frames(project, monkeypatch):
    project.makepyfile(test_synthetic=SYNTHETIC_MODULE)
    monkeypatch.setenv("LAST_TRANSPORT", "0.2")
    project.runpytest("--spinal-update", "-k", "baseline_fixture").assert_outcomes(passed=1, deselected=2)

    result = project.runpytest("--tb=long", "-k", "mismatch")

    result.assert_outcomes(failed=1, deselected=2)
    output = result.stdout.str()
    assert "setting tail_window differs: baseline [0.5, 0.9], trace [0.4, 0.9]" in output
    assert "compare.py" not in output
