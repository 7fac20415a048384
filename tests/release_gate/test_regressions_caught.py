"""The release gate must fail on damaged checkpoints, so that its detection claim stays true.

Each test runs the gate of ``test_smollm2_gate.py`` in a pytest subprocess against a regression
variant (see ``--release-candidate`` in this folder's conftest) and asserts how it fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.real_checkpoint

REPOSITORY = Path(__file__).resolve().parents[2]
GATE = Path(__file__).with_name("test_smollm2_gate.py")


def run_gate(pytester: pytest.Pytester, candidate: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        str(GATE),
        f"--rootdir={REPOSITORY}",
        "-c",
        str(REPOSITORY / "pyproject.toml"),
        "-p",
        "no:cacheprovider",
        f"--release-candidate={candidate}",
        "-k",
        "test_trace_within_default_tolerance",
    )


def test_swapped_dpo_fails_the_gate(pytester):
    result = run_gate(pytester, "dpo-swapped")

    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(["*depth trace of * + swapped DPO * is out of tolerance against baselines/smollm2-135m-instruct.json*"])


def test_late_layer_noise_fails_in_late_layers(pytester):
    result = run_gate(pytester, "noise-late")

    result.assert_outcomes(failed=1, deselected=1)
    headline = next(line for line in result.stdout.lines if "is out of tolerance against" in line)
    flagged = [int(layer) for layer in _layers_in(headline)]
    # Layers 26-30 carry the noise; nothing before the late third (layers 21-30) may be flagged.
    assert flagged and min(flagged) >= 21, headline


def _layers_in(headline: str) -> list[str]:
    """Return every layer number that the headline lists after "in layer(s)"."""
    import re

    layers = []
    for listing in re.findall(r" in layers? ([\d, -]+) \(", headline):
        for part in listing.split(","):
            low, _, high = part.strip().partition("-")
            layers += [str(layer) for layer in range(int(low), int(high or low) + 1)]
    return layers
