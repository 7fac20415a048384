"""Tests of the logit lens against each family's own forward pass and a by-hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaModel, OPTConfig, OPTForCausalLM

from pytest_spinal.architectures import resolve_lens
from pytest_spinal.errors import UnsupportedModelError

from tiny_models import TINY_FAMILIES, load_tiny_model

PROMPT = "The ferry left the dock at 6:45, two minutes late."

#: Supported families as the error messages list them: sorted, comma-separated.
SUPPORTED_LIST = ", ".join(sorted(TINY_FAMILIES))

# Written out here, independently of pytest_spinal.architectures: where each family keeps its
# final norm, which config key stores the norm's epsilon, and which weight the output head uses.
# gpt2 and gemma2 tie the head to the input embedding.
FINAL_NORM_PATH = {
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "gemma2": "model.norm",
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
}
NORM_EPSILON_KEY = {
    "llama": "rms_norm_eps",
    "mistral": "rms_norm_eps",
    "qwen2": "rms_norm_eps",
    "gemma2": "rms_norm_eps",
    "gpt2": "layer_norm_epsilon",
    "gpt_neox": "layer_norm_eps",
}
HEAD_WEIGHT_PATH = {
    "llama": "lm_head.weight",
    "mistral": "lm_head.weight",
    "qwen2": "lm_head.weight",
    "gemma2": "model.embed_tokens.weight",
    "gpt2": "transformer.wte.weight",
    "gpt_neox": "lm_head.weight",
}

# A lens that skipped the final norm or applied it twice moves log-probabilities by more than 1
# on these models. An exact lens matches them to float32 rounding.
VISIBLE_DIFFERENCE = 0.1


def get_attribute(root: object, path: str):
    for name in path.split("."):
        root = getattr(root, name)
    return root


def final_norm_by_hand(family: str, model, states: torch.Tensor) -> torch.Tensor:
    """Apply the family's final normalisation to ``states`` in float64."""
    norm = get_attribute(model, FINAL_NORM_PATH[family])
    epsilon = getattr(model.config, NORM_EPSILON_KEY[family])
    weight = norm.weight.detach().double()
    states = states.double()

    if family in ("gpt2", "gpt_neox"):
        centred = states - states.mean(dim=-1, keepdim=True)
        variance = centred.pow(2).mean(dim=-1, keepdim=True)
        return centred / torch.sqrt(variance + epsilon) * weight + norm.bias.detach().double()

    normalised = states * torch.rsqrt(states.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    # Gemma's RMSNorm scales by (1 + weight), the others by weight.
    scale = 1.0 + weight if family == "gemma2" else weight
    return normalised * scale


def logits_by_hand(family: str, model, normalised_states: torch.Tensor, *, softcap: bool = True) -> torch.Tensor:
    """Apply the output head (and gemma2's final soft-capping) to normalised states, in float64."""
    head = get_attribute(model, HEAD_WEIGHT_PATH[family]).detach().double()
    logits = normalised_states @ head.T
    cap = model.config.final_logit_softcapping if family == "gemma2" else None
    if softcap and cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def run_model(model, tokenizer):
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True)
        base = model.base_model(**inputs)
    return output, base


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_last_hidden_state_already_normalised(family, tiny_model):
    output, base = run_model(*tiny_model(family))

    torch.testing.assert_close(output.hidden_states[-1], base.last_hidden_state, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_last_layer_lens_matches_model(family, tiny_model):
    model, tokenizer = tiny_model(family)
    output, base = run_model(model, tokenizer)

    lens_log_probs = resolve_lens(model).log_probs(base.last_hidden_state, normalised=True)

    torch.testing.assert_close(lens_log_probs, torch.log_softmax(output.logits.float(), dim=-1))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_last_layer_norm_twice_differs(family, tiny_model):
    model, tokenizer = tiny_model(family)
    output, base = run_model(model, tokenizer)

    normalised_twice = resolve_lens(model).log_probs(base.last_hidden_state, normalised=False)
    difference = (normalised_twice - torch.log_softmax(output.logits.float(), dim=-1)).abs().max().item()

    assert difference > VISIBLE_DIFFERENCE


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_final_norm_away_from_identity(family, tiny_model):
    model, _ = tiny_model(family)
    weight = get_attribute(model, FINAL_NORM_PATH[family]).weight.detach()
    # Gemma's RMSNorm is the identity at weight 0, the others at weight 1.
    identity = 0.0 if family == "gemma2" else 1.0

    assert (weight - identity).abs().mean().item() > VISIBLE_DIFFERENCE


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_intermediate_lens_matches_hand(family, tiny_model):
    model, tokenizer = tiny_model(family)
    output, _ = run_model(model, tokenizer)
    states = output.hidden_states[2]

    lens_log_probs = resolve_lens(model).log_probs(states, normalised=False)
    expected = torch.log_softmax(logits_by_hand(family, model, final_norm_by_hand(family, model, states)), dim=-1)

    torch.testing.assert_close(lens_log_probs, expected.float(), rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_intermediate_lens_without_norm_differs(family, tiny_model):
    model, tokenizer = tiny_model(family)
    output, _ = run_model(model, tokenizer)
    states = output.hidden_states[2]

    skipped_norm = resolve_lens(model).log_probs(states, normalised=True)
    expected = torch.log_softmax(logits_by_hand(family, model, final_norm_by_hand(family, model, states)), dim=-1)

    assert (skipped_norm - expected.float()).abs().max().item() > VISIBLE_DIFFERENCE


def test_gemma2_softcap_changes_logits(tiny_model):
    model, tokenizer = tiny_model("gemma2")
    output, _ = run_model(model, tokenizer)
    normalised = final_norm_by_hand("gemma2", model, output.hidden_states[2])

    capped = torch.log_softmax(logits_by_hand("gemma2", model, normalised), dim=-1)
    uncapped = torch.log_softmax(logits_by_hand("gemma2", model, normalised, softcap=False), dim=-1)

    assert resolve_lens(model).softcap == 2.0
    assert (capped - uncapped).abs().max().item() > VISIBLE_DIFFERENCE


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lens_layer_count(family, tiny_model):
    model, _ = tiny_model(family)

    assert resolve_lens(model).num_layers == 4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_root_probs_square_to_probs(family, tiny_model):
    model, tokenizer = tiny_model(family)
    output, _ = run_model(model, tokenizer)
    lens = resolve_lens(model)
    states = output.hidden_states[1]

    squared = lens.root_probs(states, normalised=False) ** 2
    probabilities = lens.log_probs(states, normalised=False).exp()

    torch.testing.assert_close(squared, probabilities)
    # Soft-capping needs the logits themselves, so only gemma2 takes the softmax path.
    assert lens.fuses_roots(torch.float32) == (family != "gemma2")


def test_root_probs_fill_buffer(tiny_model):
    model, tokenizer = tiny_model("llama")
    output, _ = run_model(model, tokenizer)
    lens = resolve_lens(model)
    states = output.hidden_states[2][0]
    buffer = lens.roots_buffer(states.shape[0] + 3, torch.float32)

    roots = lens.root_probs(states, normalised=False, out=buffer[: states.shape[0]])

    assert roots.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(roots, lens.log_probs(states, normalised=False).mul(0.5).exp())


def test_root_probs_survive_underflow(tiny_model):
    model, tokenizer = tiny_model("llama")
    output, _ = run_model(model, tokenizer)
    lens = resolve_lens(model)
    # Logits spread over thousands: most probabilities underflow even in float64, the largest do not.
    states = lens.final_norm(output.hidden_states[2][0]) * 2000.0

    roots = lens.root_probs(states, normalised=True)
    expected = torch.softmax(lens.head(states).double(), dim=-1).sqrt()

    assert torch.isfinite(roots).all()
    torch.testing.assert_close(roots.double(), expected, atol=1e-6, rtol=1e-5)


def test_root_probs_bfloat16_head_float32(tiny_model):
    model, tokenizer = tiny_model("llama")
    output, _ = run_model(model, tokenizer)
    # A copy, because the fixture's model is shared with other tests.
    lens = resolve_lens(copy.deepcopy(model).to(torch.bfloat16))
    states = output.hidden_states[1].to(torch.bfloat16)

    assert not lens.fuses_roots(torch.float32)
    assert lens.roots_buffer(4, torch.float32) is None
    roots = lens.root_probs(states, normalised=False, out=None)
    assert roots.dtype == torch.float32
    torch.testing.assert_close(roots.pow(2).sum(dim=-1), torch.ones(roots.shape[:-1]))


def test_log_probs_never_narrower_than_float32(tiny_model):
    model, tokenizer = tiny_model("llama")
    output, _ = run_model(model, tokenizer)
    lens = resolve_lens(model)
    states = output.hidden_states[1]

    assert lens.log_probs(states, normalised=False).dtype == torch.float32
    assert lens.log_probs(states, normalised=False, dtype=torch.bfloat16).dtype == torch.float32
    assert lens.log_probs(states, normalised=False, dtype=torch.float64).dtype == torch.float64


# Unsupported models


def test_encoder_only_rejected():
    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)

    with pytest.raises(UnsupportedModelError) as raised:
        resolve_lens(BertForMaskedLM(config))

    message = str(raised.value)
    assert "BertForMaskedLM" in message
    assert SUPPORTED_LIST in message


def test_model_without_head_class_rejected():
    model, _ = load_tiny_model("llama")

    with pytest.raises(UnsupportedModelError) as raised:
        resolve_lens(LlamaModel(model.config))

    message = str(raised.value)
    assert "LlamaModel" in message
    assert "AutoModelForCausalLM" in message


def test_unsupported_family_rejected():
    config = OPTConfig(
        vocab_size=99,
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )

    with pytest.raises(UnsupportedModelError) as raised:
        resolve_lens(OPTForCausalLM(config))

    message = str(raised.value)
    assert "OPTForCausalLM" in message
    assert "'opt'" in message
    assert SUPPORTED_LIST in message


def test_missing_head_rejected(monkeypatch):
    model, _ = load_tiny_model("llama")
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)

    with pytest.raises(UnsupportedModelError) as raised:
        resolve_lens(model)

    message = str(raised.value)
    assert "LlamaForCausalLM" in message
    assert "no output head" in message
