"""Release-gate example: SmolLM2-135M-Instruct against its committed baseline.

``--release-candidate NAME`` replaces the packaged checkpoint with one of the regression
variants of ``benchmarks/spinal_variants.py``, to show what a failing gate reports:

- ``dpo-swapped``: a few steps of DPO that prefer the rejected answers of a preference set;
- ``fine-tuned``: a few steps of next-token fine-tuning on unrelated text;
- ``noise-late`` and ``noise-early``: Gaussian noise on every weight of decoder layers 26-30 or 1-5.
"""

from __future__ import annotations

import pytest

from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT

PACKAGED = "packaged"


def pytest_addoption(parser: pytest.Parser) -> None:
    import spinal_variants

    parser.addoption(
        "--release-candidate",
        dest="release_candidate",
        default=PACKAGED,
        choices=(PACKAGED, *spinal_variants.REGRESSIONS),
        help="checkpoint under test: the packaged SmolLM2 (default) or one of its regression variants",
    )


@pytest.fixture(scope="session")
def release_candidate(pytestconfig: pytest.Config):
    """The checkpoint under test: the packaged SmolLM2, or a regression variant derived from it."""
    name = pytestconfig.option.release_candidate
    if name == PACKAGED:
        return DEFAULT_CHECKPOINT

    import spinal_variants
    from pytest_spinal.checkpoints import load_checkpoint

    variant, _ = spinal_variants.derive_regression(name, load_checkpoint(DEFAULT_CHECKPOINT, device="cpu"))
    return variant
