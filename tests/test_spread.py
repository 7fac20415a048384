"""Tests of a trace's spread: bootstrap resamples of the prompts, per layer, for auto tolerances."""

from __future__ import annotations

import logging

import pytest
import torch

from pytest_spinal import tracing
from pytest_spinal.metrics import contraction
from pytest_spinal.probes import load_probes
from pytest_spinal.trace import DepthTrace, TraceSettings
from pytest_spinal.tracing import SPREAD_RESAMPLES, resampled_contractions, trace_checkpoint

from tiny_models import tiny_model_path

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def llama_trace() -> DepthTrace:
    return trace_checkpoint(tiny_model_path("llama"), device="cpu")


def random_prompts(generator: torch.Generator, counts: list[int], width: int) -> torch.Tensor:
    # Rows with a decaying spectrum, like hidden states, so that every window is well defined.
    scales = torch.arange(1, width + 1, dtype=torch.float32) ** -1.5
    return torch.randn(sum(counts), width, generator=generator) * scales


def test_resampled_contraction_equals_stacked_rows():
    # A resample's Gram matrix is a weighted sum of per-prompt Gram matrices; it must give the
    # contraction of the drawn prompts' rows stacked with repeats.
    generator = torch.Generator().manual_seed(1)
    counts = [7, 12, 5, 9, 11, 6, 8, 10]
    states = random_prompts(generator, counts, width=24)
    weights = torch.tensor([[2, 0, 1, 1, 0, 3, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.float64)

    values = resampled_contractions(states, counts, weights, TraceSettings())

    prompts = torch.split(states, counts)
    for resample, row in enumerate(weights.long().tolist()):
        stacked = torch.cat([prompt for prompt, repeats in zip(prompts, row) for _ in range(repeats)])
        assert values[resample] == pytest.approx(contraction(stacked), rel=1e-9)


def test_wide_model_path_matches_prompt_grams(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    counts = [6, 9, 7, 8, 5, 10, 6, 9]
    states = random_prompts(generator, counts, width=20)
    weights = torch.randint(0, 3, (4, len(counts)), generator=generator).to(torch.float64)
    weights[:, 0] += 1

    with_grams = resampled_contractions(states, counts, weights, TraceSettings())
    monkeypatch.setattr(tracing, "_PROMPT_GRAMS_MAX_BYTES", 0)
    without_grams = resampled_contractions(states, counts, weights, TraceSettings())

    assert without_grams == pytest.approx(with_grams, rel=1e-9)


def test_spread_shapes_and_signs(llama_trace):
    spread = llama_trace.spread

    assert spread is not None
    assert len(spread.contraction) == NUM_LAYERS + 1
    assert len(spread.transport) == NUM_LAYERS
    assert spread.resamples == SPREAD_RESAMPLES
    assert all(value > 0 for value in spread.contraction + spread.transport)


def test_spread_small_against_values(llama_trace):
    # Resampling 56 prompts moves a mean by a few per cent, not by its own size.
    spread = llama_trace.spread
    for values, spreads in [(llama_trace.contraction, spread.contraction), (llama_trace.transport, spread.transport)]:
        assert all(noise < 0.2 * abs(value) for value, noise in zip(values, spreads))


def test_transport_spread_matches_direct_bootstrap(llama_trace):
    # Recompute the bootstrap from the stored per-prompt transport and the probe token counts.
    encoded_counts = _prompt_token_counts()
    generator = torch.Generator().manual_seed(tracing.SPREAD_SEED)
    drawn = torch.randint(len(encoded_counts), (SPREAD_RESAMPLES, len(encoded_counts)), generator=generator)
    per_prompt = torch.tensor(llama_trace.transport_per_prompt, dtype=torch.float64)
    tokens = torch.tensor(encoded_counts, dtype=torch.float64)

    means = torch.stack([(per_prompt[row] * tokens[row, None]).sum(0) / tokens[row].sum() for row in drawn])

    assert list(llama_trace.spread.transport) == pytest.approx(means.std(dim=0).tolist(), rel=1e-6)


def test_spread_deterministic(llama_trace):
    again = trace_checkpoint(tiny_model_path("llama"), device="cpu")

    assert again.spread == llama_trace.spread


def test_spread_skipped_on_request():
    trace = trace_checkpoint(tiny_model_path("gpt2"), device="cpu", spread=False)

    assert trace.spread is None


def test_spread_round_trips_through_json(llama_trace):
    assert DepthTrace.loads(llama_trace.dumps()).spread == llama_trace.spread


def test_too_few_prompts_leave_no_spread(caplog):
    prompts = list(load_probes().prompts[: tracing.MIN_SPREAD_PROMPTS - 1])

    with caplog.at_level(logging.WARNING, logger="pytest_spinal.tracing"):
        trace = trace_checkpoint(tiny_model_path("gpt2"), probes=prompts, device="cpu")

    assert trace.spread is None
    assert f"the probe set has {len(prompts)} prompts and resampling needs at least 8" in caplog.text


def _prompt_token_counts() -> list[int]:
    from pytest_spinal.checkpoints import load_checkpoint
    from pytest_spinal.probes import encode_probes

    loaded = load_checkpoint(tiny_model_path("llama"), device="cpu")
    return [len(ids) for ids in encode_probes(loaded.tokenizer, load_probes()).token_ids]
