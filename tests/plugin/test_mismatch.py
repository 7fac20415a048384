"""Baselines that cannot be compared with a trace fail, whatever the tolerance, and name the difference."""

from __future__ import annotations

import json

import pytest

from pytest_spinal import Tolerance, assert_trace_close, load_probes
from pytest_spinal.compare import TraceMismatch

#: So wide that only a mismatch, never a drift, can fail a comparison.
ANY_CHANGE = Tolerance(atol=100.0)


@pytest.mark.parametrize(
    ("difference", "message"),
    [
        ({"fingerprint": "sha256:" + "b" * 64}, "probe token ids differ: baseline sha256:aaaaaaaaaaaa..."),
        ({"tail_window": (0.4, 0.9)}, "setting tail_window differs: baseline [0.5, 0.9], trace [0.4, 0.9]"),
        (
            {"contraction": (1.0, 0.9, 0.8, 0.7), "transport": (0.5, 0.4, 0.3)},
            "layer count differs: baseline 4 layers, trace 3",
        ),
    ],
    ids=["probes", "tail-window", "layer-count"],
)
def test_mismatch_fails_naming_difference(synthetic_trace, difference, message):
    observed = synthetic_trace(**difference)

    with pytest.raises(TraceMismatch) as raised:
        assert_trace_close(observed, synthetic_trace(), contraction=ANY_CHANGE, transport=ANY_CHANGE)

    assert message in str(raised.value)


def test_mismatch_message_says_no_drift_measured(synthetic_trace):
    with pytest.raises(TraceMismatch) as raised:
        assert_trace_close(synthetic_trace(tail_window=(0.4, 0.9)), synthetic_trace(), baseline_name="baseline gates/a.json")

    assert str(raised.value).startswith("baseline gates/a.json is not comparable with this trace, so no drift was measured:")


GATE_MODULE = """
def test_gate(spinal_trace, spinal_baseline):
    spinal_baseline.assert_close(spinal_trace("model"))
"""


def test_other_probe_file_fails(project):
    project.makepyfile(test_gate=GATE_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=1)
    other_prompts = load_probes().prompts[12:24]
    (project.path / "other_probes.txt").write_text("\n".join(other_prompts) + "\n", encoding="utf-8")

    result = project.runpytest("--spinal-probes", "other_probes.txt")

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*: baselines/test_gate/test_gate.json is not comparable with this trace, so no drift was measured:",
            "*  - probe token ids differ: baseline sha256:*",
        ]
    )


def test_other_dtype_is_compared_with_a_note(project):
    # A model dtype is a source of drift for the tolerances to absorb (SPINAL.md pins probes,
    # settings and layers only), so it is compared and named in the message if the gate fails.
    project.makepyfile(test_gate=GATE_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=1)

    passing = project.runpytest("--spinal-dtype", "bfloat16")
    failing = project.runpytest("--spinal-dtype", "bfloat16", "-o", "spinal_contraction_atol=1e-9", "-o", "spinal_contraction_z=0")

    passing.assert_outcomes(passed=1)
    passing.stdout.fnmatch_lines(["note: model dtype differs: baseline float32, trace bfloat16"])
    failing.assert_outcomes(failed=1)
    failing.stdout.fnmatch_lines(["*Note: model dtype differs: baseline float32, trace bfloat16"])


SYNTHETIC_MODULE = """
from pytest_spinal import DepthTrace, TraceSettings


def test_gate(spinal_baseline):
    trace = DepthTrace(
        contraction=(1.0, 0.9, 0.8, 0.7, 0.6),
        transport=(0.5, 0.4, 0.3, 0.2),
        transport_per_prompt=((0.5, 0.4, 0.3, 0.2),),
        settings=TraceSettings(),
        probes={"fingerprint": "sha256:0"},
        checkpoint={"name": "synthetic", "dtype": "float32"},
        environment={},
    )
    spinal_baseline.assert_close(trace)
"""


@pytest.fixture
def recorded_baseline(project):
    """Path of the synthetic gate's baseline, freshly recorded."""
    project.makepyfile(test_synthetic=SYNTHETIC_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=1)
    return project.path / "baselines" / "test_synthetic" / "test_gate.json"


def rewrite_contraction(path, layer, value):
    """Set one contraction value in a baseline file, leaving its checksum and derived figures as they were."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["contraction"][layer] = value
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def test_nan_in_baseline_fails(project, recorded_baseline):
    rewrite_contraction(recorded_baseline, 2, float("nan"))

    result = project.runpytest()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{recorded_baseline}: invalid JSON (NaN is not a finite number*"])


def test_truncated_baseline_fails(project, recorded_baseline):
    text = recorded_baseline.read_text(encoding="utf-8")
    recorded_baseline.write_text(text[: len(text) // 2], encoding="utf-8")

    result = project.runpytest()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*{recorded_baseline}: invalid JSON (*"])


def set_per_prompt_transport(path, value):
    """Set transport 0->1 of the first prompt in a baseline file, leaving the rest as it was."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["transport_per_prompt"][0][0] = value
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


@pytest.mark.parametrize(
    "edit",
    [
        lambda path: rewrite_contraction(path, 2, 0.85),
        lambda path: rewrite_contraction(path, 0, 1.05),
        lambda path: set_per_prompt_transport(path, 0.45),
    ],
    ids=["contraction-layer-2", "contraction-layer-0", "per-prompt-transport"],
)
def test_edited_baseline_fails(project, recorded_baseline, edit):
    edit(recorded_baseline)

    result = project.runpytest()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"*{recorded_baseline}: the checksum or derived figures do not match the profiles, so the file was edited*"]
    )
