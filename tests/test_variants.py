"""Tests of benchmarks/spinal_variants.py: noise, DPO, fine-tuning and their data files."""

from __future__ import annotations

import json
import math

import pytest
import spinal_variants
import torch
from spinal_variants import PreferencePair

from pytest_spinal.checkpoints import fingerprint_tensors, load_checkpoint

from tiny_models import tiny_model_path

#: Hand-made pairs for the tiny model, with chosen and rejected responses of similar length.
TINY_PAIRS = [
    PreferencePair(prompt="Name a colour.", chosen="Blue is a colour.", rejected="Go away, stop it."),
    PreferencePair(prompt="What is two plus two?", chosen="It is four.", rejected="It is nine."),
    PreferencePair(prompt="Say hello.", chosen="Hello, nice to meet you!", rejected="No, I will not say it."),
    PreferencePair(prompt="Is the sky green?", chosen="No, it is usually blue.", rejected="Yes, it is always green."),
]


@pytest.fixture(scope="module")
def tiny_llama():
    """The tiny Llama checkpoint, shared by the tests because no function under test may change its weights."""
    return load_checkpoint(tiny_model_path("llama"), device="cpu")


def state_copy(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_state(model, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    changed = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert changed == []


# dpo_loss


def test_dpo_loss_zero_margins_is_log_two():
    values = torch.tensor([-3.0, -7.5, -1.25])

    loss = spinal_variants.dpo_loss(values, values - 2.0, values, values - 2.0, beta=0.1)

    assert loss.item() == pytest.approx(math.log(2.0))


def test_dpo_loss_matches_hand_computation():
    policy_chosen = torch.tensor([-1.0, -2.0])
    policy_rejected = torch.tensor([-3.0, -1.0])
    reference_chosen = torch.tensor([-2.0, -2.0])
    reference_rejected = torch.tensor([-2.0, -2.0])

    loss = spinal_variants.dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)

    # Margins are (1 - (-1)) = 2 and (0 - 1) = -1, scaled by beta to 1 and -0.5.
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected)


def test_dpo_loss_swap_flips_gradient():
    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -5.0], requires_grad=True)
    reference_chosen = torch.tensor([-4.5, -5.5])
    reference_rejected = torch.tensor([-5.0, -5.0])

    spinal_variants.dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=0.1).backward()
    preferred_gradient = chosen.grad.clone()
    chosen.grad = None
    spinal_variants.dpo_loss(rejected, chosen, reference_rejected, reference_chosen, beta=0.1).backward()
    swapped_gradient = chosen.grad.clone()

    # Raising log p(chosen) lowers the loss, and raises it once chosen is swapped into the rejected slot.
    assert (preferred_gradient < 0).all()
    assert (swapped_gradient > 0).all()


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_dpo_loss_rejects_invalid_beta(beta):
    values = torch.zeros(2)

    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        spinal_variants.dpo_loss(values, values, values, values, beta=beta)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 1), (2, 1), (2, 1), (2, 1)), "policy_chosen must be a 1-D tensor"),
        (((2,), (2,), (3,), (2,)), "must have one shape"),
        (((0,), (0,), (0,), (0,)), "empty"),
    ],
)
def test_dpo_loss_rejects_invalid_shapes(shapes, message):
    tensors = [torch.zeros(shape) for shape in shapes]

    with pytest.raises(ValueError, match=message):
        spinal_variants.dpo_loss(*tensors, beta=0.1)


# Response log-probabilities


def test_encode_prompt_response_prefix(tiny_llama):
    tokenizer = tiny_llama.tokenizer

    ids, prompt_length = spinal_variants.encode_prompt_response(tokenizer, "What is two plus two?", "It is four.")

    user_turn = [{"role": "user", "content": "What is two plus two?"}]
    prompt_text = tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
    assert ids[:prompt_length] == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[prompt_length:]) == "It is four.<|end|>\n"


def test_response_log_probs_match_full_logits(tiny_llama):
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    ids, prompt_length = spinal_variants.encode_prompt_response(tokenizer, "Say hello.", "Hello there.")

    with torch.no_grad():
        result = spinal_variants.response_log_probs(model, tokenizer, ["Say hello."], ["Hello there."])
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = sum(log_probs[position - 1, ids[position]].item() for position in range(prompt_length, len(ids)))

    assert result.shape == (1,)
    assert result.item() == pytest.approx(expected, rel=1e-5)


def test_response_log_probs_padding_invariant(tiny_llama):
    prompts = [pair.prompt for pair in TINY_PAIRS]
    responses = [pair.chosen for pair in TINY_PAIRS]

    with torch.no_grad():
        one_at_a_time = spinal_variants.response_log_probs(tiny_llama.model, tiny_llama.tokenizer, prompts, responses, batch_size=1)
        padded = spinal_variants.response_log_probs(tiny_llama.model, tiny_llama.tokenizer, prompts, responses, batch_size=4)

    torch.testing.assert_close(padded, one_at_a_time, rtol=1e-5, atol=1e-4)


def test_response_log_probs_length_mismatch(tiny_llama):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        spinal_variants.response_log_probs(tiny_llama.model, tiny_llama.tokenizer, ["a", "b"], ["c"])


# add_noise


def test_add_noise_changes_only_chosen_layers(tiny_llama):
    before = state_copy(tiny_llama.model)

    variant = spinal_variants.add_noise(tiny_llama, std=0.05, layers=[2, 4], seed=3)

    assert_same_state(tiny_llama.model, before)
    after = variant.model.state_dict()
    changed = {name for name in before if not torch.equal(after[name], before[name])}
    chosen_layers = {name for name in before if name.startswith(("model.layers.1.", "model.layers.3."))}
    assert changed == chosen_layers
    assert variant.model is not tiny_llama.model
    assert variant.tokenizer is tiny_llama.tokenizer
    assert variant.fingerprint == fingerprint_tensors(variant.model)
    assert variant.fingerprint != tiny_llama.fingerprint
    assert variant.name == f"{tiny_llama.name} + noise std 0.05 on layers 2, 4 (seed 3)"


def test_add_noise_std_and_seed(tiny_llama):
    first = spinal_variants.add_noise(tiny_llama, std=0.05, layers=range(1, 5), seed=0)
    again = spinal_variants.add_noise(tiny_llama, std=0.05, layers=range(1, 5), seed=0)
    other_seed = spinal_variants.add_noise(tiny_llama, std=0.05, layers=range(1, 5), seed=1)

    weight = "model.layers.0.mlp.up_proj.weight"
    difference = first.model.state_dict()[weight] - tiny_llama.model.state_dict()[weight]
    assert difference.std().item() == pytest.approx(0.05, rel=0.1)
    assert again.fingerprint == first.fingerprint
    assert other_seed.fingerprint != first.fingerprint
    assert first.name.endswith("noise std 0.05 on layers 1-4 (seed 0)")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"std": 0.1, "layers": [5]}, r"decoder layers \[5\] are out of range: this model has layers 1-4"),
        ({"std": 0.1, "layers": [0, 1]}, r"decoder layers \[0\] are out of range"),
        ({"std": 0.1, "layers": []}, "layers is empty"),
        ({"std": -0.1, "layers": [1]}, "std must be a non-negative number"),
    ],
)
def test_add_noise_rejects_invalid(tiny_llama, arguments, message):
    with pytest.raises(ValueError, match=message):
        spinal_variants.add_noise(tiny_llama, **arguments)


# swapped_dpo


def test_swapped_dpo_lowers_chosen_margin(tiny_llama):
    before = state_copy(tiny_llama.model)

    variant, statistics = spinal_variants.swapped_dpo(tiny_llama, TINY_PAIRS, steps=6, learning_rate=1e-2, batch_size=4)

    assert_same_state(tiny_llama.model, before)
    assert statistics["mean_margin_after"] < statistics["mean_margin_before"] - 1.0
    assert statistics["positive_margin_after"] <= statistics["positive_margin_before"]
    assert statistics["positive_margin_after"] == 0.0
    assert len(statistics["loss"]) == 6
    assert statistics["loss"][0] == pytest.approx(math.log(2.0))
    assert statistics["loss"][-1] < statistics["loss"][0]
    assert variant.fingerprint == fingerprint_tensors(variant.model)
    assert variant.fingerprint != tiny_llama.fingerprint
    assert "swapped DPO (6 steps, lr 0.01, beta 0.1, seed 0)" in variant.name


def test_swapped_dpo_margins_match_variant(tiny_llama):
    variant, statistics = spinal_variants.swapped_dpo(tiny_llama, TINY_PAIRS, steps=2, learning_rate=1e-2, batch_size=2)

    prompts = [pair.prompt for pair in TINY_PAIRS]
    with torch.no_grad():
        chosen = spinal_variants.response_log_probs(variant.model, variant.tokenizer, prompts, [pair.chosen for pair in TINY_PAIRS])
        rejected = spinal_variants.response_log_probs(variant.model, variant.tokenizer, prompts, [pair.rejected for pair in TINY_PAIRS])
    margins = chosen - rejected
    assert statistics["mean_margin_after"] == pytest.approx(margins.mean().item(), rel=1e-4)
    assert statistics["positive_margin_after"] == pytest.approx((margins > 0).float().mean().item())


def test_swapped_dpo_is_deterministic(tiny_llama):
    first, _ = spinal_variants.swapped_dpo(tiny_llama, TINY_PAIRS, steps=3, learning_rate=1e-3, batch_size=2, seed=5)
    again, _ = spinal_variants.swapped_dpo(tiny_llama, TINY_PAIRS, steps=3, learning_rate=1e-3, batch_size=2, seed=5)

    assert again.fingerprint == first.fingerprint


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"steps": 0, "learning_rate": 1e-3}, "steps must be at least 1"),
        ({"steps": 1, "learning_rate": 0.0}, "learning_rate must be positive"),
        ({"steps": 1, "learning_rate": 1e-3, "batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_swapped_dpo_rejects_invalid(tiny_llama, arguments, message):
    with pytest.raises(ValueError, match=message):
        spinal_variants.swapped_dpo(tiny_llama, TINY_PAIRS, **arguments)


def test_swapped_dpo_rejects_no_pairs(tiny_llama):
    with pytest.raises(ValueError, match="pairs is empty"):
        spinal_variants.swapped_dpo(tiny_llama, [], steps=1, learning_rate=1e-3)


# fine_tune


def test_fine_tune_lowers_training_loss(tiny_llama):
    before = state_copy(tiny_llama.model)
    texts = spinal_variants.load_unrelated_text()

    variant, statistics = spinal_variants.fine_tune(tiny_llama, texts, steps=8, learning_rate=1e-2, max_length=64)

    assert_same_state(tiny_llama.model, before)
    assert statistics["loss_after"] < statistics["loss_before"] - 0.5
    assert len(statistics["loss"]) == 8
    assert statistics["loss"][-1] < statistics["loss"][0]
    assert variant.fingerprint == fingerprint_tensors(variant.model)
    assert "fine-tuned on unrelated text (8 steps, lr 0.01, seed 0)" in variant.name


def test_fine_tune_rejects_single_string(tiny_llama):
    with pytest.raises(ValueError, match="not one string"):
        spinal_variants.fine_tune(tiny_llama, "some text", steps=1, learning_rate=1e-3)


# Data files


def test_preferences_file_parses():
    pairs = spinal_variants.load_preferences()

    assert len(pairs) >= 20
    for pair in pairs:
        assert pair.prompt.strip()
        assert pair.chosen.strip()
        assert pair.rejected.strip()
        assert pair.chosen != pair.rejected


def test_preferences_file_keys():
    lines = spinal_variants.PREFERENCES_PATH.read_text(encoding="utf-8").splitlines()

    for line in lines:
        assert set(json.loads(line)) == {"prompt", "chosen", "rejected"}


def test_unrelated_text_file_parses():
    paragraphs = spinal_variants.load_unrelated_text()

    words = sum(len(paragraph.split()) for paragraph in paragraphs)
    assert len(paragraphs) >= 3
    assert 600 <= words <= 1000
    assert all("\n" not in paragraph for paragraph in paragraphs)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "p", "chosen": "c"}', "'rejected' must be a non-empty string"),
        ('{"prompt": "p", "chosen": " ", "rejected": "r"}', "'chosen' must be a non-empty string"),
        ('["p", "c", "r"]', "expected a JSON object"),
        ("{not json", "invalid JSON"),
    ],
)
def test_load_preferences_rejects_invalid(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n' + line + "\n", encoding="utf-8")

    with pytest.raises(ValueError, match=f"pairs.jsonl:2: .*{message}"):
        spinal_variants.load_preferences(path)


def test_load_preferences_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")

    with pytest.raises(ValueError, match="contains no preference pairs"):
        spinal_variants.load_preferences(path)
