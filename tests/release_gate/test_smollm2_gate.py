"""Release gate of SmolLM2-135M-Instruct: its depth trace must stay within the baseline's tolerance."""

import pytest

from pytest_spinal import Tolerance

pytestmark = pytest.mark.real_checkpoint

BASELINE = "smollm2-135m-instruct"


def test_trace_within_default_tolerance(spinal_trace, spinal_baseline, release_candidate):
    trace = spinal_trace(release_candidate)
    spinal_baseline.assert_close(trace, name=BASELINE)


def test_late_layers_do_not_lose_alignment(spinal_trace, spinal_baseline, release_candidate):
    # One-sided on the late third: contraction may not fall and transport may not rise.
    trace = spinal_trace(release_candidate)
    spinal_baseline.assert_close(
        trace,
        name=BASELINE,
        contraction=Tolerance(atol=0.02, rtol=0.02, one_sided=True, layers="late"),
        transport=Tolerance(atol=0.02, rtol=0.02, one_sided=True, layers="late"),
        layers="late",
    )
