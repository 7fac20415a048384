"""Release-gate example: SmolLM2-135M-Instruct against its committed baseline.

``--perturb-late-layers STD`` adds Gaussian noise of standard deviation STD (fixed seed) to
every weight of the last five decoder layers before tracing, to show what a failing gate
reports.
"""

from __future__ import annotations

import pytest

from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT

#: Decoder layers (1-based) that --perturb-late-layers changes in the 30-layer checkpoint.
PERTURBED_LAYERS = range(26, 31)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--perturb-late-layers",
        dest="perturb_late_layers",
        type=float,
        default=0.0,
        metavar="STD",
        help="add Gaussian noise of this standard deviation to decoder layers 26-30 of the release candidate",
    )


@pytest.fixture(scope="session")
def release_candidate(pytestconfig: pytest.Config):
    """The checkpoint under test: the packaged SmolLM2, optionally with late-layer noise."""
    std = pytestconfig.option.perturb_late_layers
    if not std:
        return DEFAULT_CHECKPOINT
    return perturbed_checkpoint(std, layers=PERTURBED_LAYERS)


def perturbed_checkpoint(std: float, *, layers: range, seed: int = 0):
    """Load the packaged SmolLM2 and add noise of ``std`` to every weight of decoder ``layers``."""
    import torch

    from pytest_spinal.checkpoints import LoadedCheckpoint, fingerprint_tensors, load_checkpoint

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for parameter in loaded.model.model.layers[layer - 1].parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    name = f"{DEFAULT_CHECKPOINT} + noise std {std:g} on layers {layers.start}-{layers.stop - 1}"
    return LoadedCheckpoint(model=loaded.model, tokenizer=loaded.tokenizer, name=name, fingerprint=fingerprint_tensors(loaded.model))
