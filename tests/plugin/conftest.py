"""Fixtures for the plugin tests: tiny checkpoints, a drifted copy, pytest projects and synthetic traces.

The tests here run real pytest sessions through ``pytester``, which ``tests/conftest.py`` enables.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

import pytest

from pytest_spinal.trace import DepthTrace, TraceSettings, TraceSpread

REPOSITORY = Path(__file__).resolve().parents[2]
TINY_LLAMA = REPOSITORY / "fixtures" / "tiny" / "llama"

#: Standard deviation of the Gaussian noise added to the last decoder layer's weight matrices.
#: With the tiny llama it moves transport 3->4 by about 0.08, twice the default allowed change.
DRIFT_STD = 0.05

def add_last_layer_noise(source: Path, target: Path, *, std: float = DRIFT_STD, seed: int = 0) -> Path:
    """Copy the checkpoint ``source`` to ``target`` with Gaussian noise on its last decoder layer's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.model.layers[-1].parameters():
            if parameter.dim() == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="session", autouse=True)
def preloaded_tracing_modules() -> None:
    """Import everything a trace needs, in this process, before any in-process pytest run.

    ``pytester.runpytest`` removes the modules that an inner session imported once it ends. torch
    cannot be imported a second time in one process, and a re-imported ``pytest_spinal.compare``
    would be a second copy of its module state, so both must already be loaded when a run starts.
    hypothesis is imported by its pytest plugin in every inner session. Importing it here saves
    a fresh import and assertion rewrite of the whole package per run, about a second each.
    """
    import hypothesis  # noqa: F401
    import pytest_spinal.report  # noqa: F401
    import pytest_spinal.summary  # noqa: F401
    from pytest_spinal.probes import load_probes
    from pytest_spinal.tracing import trace_checkpoint

    trace_checkpoint(TINY_LLAMA, probes=load_probes().prompts[:2], device="cpu")


@pytest.fixture(scope="session")
def drifted_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama checkpoint with noise on its last decoder layer, as a folder."""
    return add_last_layer_noise(TINY_LLAMA, tmp_path_factory.mktemp("drifted") / "llama")


#: Prompts of the projects' probe file: the first of the packaged set, about 770 tokens with the
#: tiny llama's chat template, enough for the contraction fit of a 64-wide model.
PROJECT_PROBES = 12

#: ini file of every project: trace on the CPU over ``probes.txt``.
PROJECT_INI = "[pytest]\nspinal_device = cpu\nspinal_probes = probes.txt\n"


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester project that traces on the CPU, with the tiny llama copied to ``model/``.

    The project's probe file ``probes.txt`` contains a short probe set, to keep each trace fast.
    CI is unset because ``--spinal-update`` is a usage error under CI; tests of the CI behaviour
    set it again themselves.
    """
    from pytest_spinal.probes import load_probes

    monkeypatch.delenv("CI", raising=False)
    pytester.makeini(PROJECT_INI)
    prompts = load_probes().prompts[:PROJECT_PROBES]
    (pytester.path / "probes.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    shutil.copytree(TINY_LLAMA, pytester.path / "model")
    return pytester


@pytest.fixture
def replace_model(project: pytest.Pytester) -> Callable[[Path], None]:
    """A function that replaces the project's ``model/`` folder with a copy of a checkpoint."""

    def replace(checkpoint: Path) -> None:
        shutil.rmtree(project.path / "model")
        shutil.copytree(checkpoint, project.path / "model")

    return replace


SyntheticTrace = Callable[..., DepthTrace]


def build_trace(
    contraction: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6),
    transport: Sequence[float] = (0.5, 0.4, 0.3, 0.2),
    *,
    tail_window: tuple[float, float] = (0.5, 0.9),
    fingerprint: str = "sha256:" + "a" * 64,
    dtype: str = "float32",
    name: str = "synthetic",
    prompts: int = 2,
    spread: tuple[Sequence[float], Sequence[float]] | None = None,
) -> DepthTrace:
    """Build a depth trace from explicit profiles; every prompt gets the overall transport.

    ``spread`` is ``(contraction spread, transport spread)``, or ``None`` for a trace without one.
    """
    return DepthTrace(
        contraction=tuple(contraction),
        transport=tuple(transport),
        transport_per_prompt=tuple(tuple(transport) for _ in range(prompts)),
        settings=TraceSettings(tail_window=tail_window),
        probes={"source": "synthetic", "fingerprint": fingerprint, "prompts": prompts, "tokens": 10 * prompts},
        checkpoint={"name": name, "dtype": dtype},
        environment={"device": "cpu"},
        spread=None if spread is None else TraceSpread(tuple(spread[0]), tuple(spread[1]), resamples=32, seed=0),
    )


@pytest.fixture
def synthetic_trace() -> SyntheticTrace:
    """The function :func:`build_trace`, for tests that need traces without a model."""
    return build_trace
