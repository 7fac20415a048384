"""Derive variants of a loaded checkpoint, for benchmarks that check what the release gate catches.

Each function takes a :class:`~pytest_spinal.checkpoints.LoadedCheckpoint` and returns a new one:
a deep copy of the model with changed weights, the same tokenizer object, a ``name`` that
describes the change and a fingerprint recomputed from the new weights. The input model's weights
are never changed. The variants are:

- :func:`add_noise`: Gaussian noise on every parameter of chosen decoder layers;
- :func:`swapped_dpo`: a few steps of DPO with chosen and rejected responses swapped, which trains
  the model to prefer the worse response, as a stand-in for alignment being undone;
- :func:`fine_tune`: a few steps of plain next-token training on unrelated text, as a stand-in
  for a benign update.

Everything is seeded. The functions run on the device of the input model, in its dtype. The
benchmark and the tests use the CPU and float32.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pytest_spinal.checkpoints import LoadedCheckpoint, fingerprint_tensors

DATA_FOLDER = Path(__file__).resolve().parent / "data"
PREFERENCES_PATH = DATA_FOLDER / "preferences.jsonl"
UNRELATED_TEXT_PATH = DATA_FOLDER / "unrelated_text.txt"

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")

#: Decoder layers (1-based) of the 30-layer SmolLM2 that the noise regressions change.
LATE_LAYERS = range(26, 31)
EARLY_LAYERS = range(1, 6)
NOISE_STD = 0.02
TRAINING_STEPS = 8
LEARNING_RATE = 1e-5

#: Regression variants by name, as the gate benchmark and the release-gate suite derive them.
REGRESSIONS = {
    "dpo-swapped": f"{TRAINING_STEPS} steps of DPO with chosen and rejected swapped (lr {LEARNING_RATE:g}, beta 0.1)",
    "fine-tuned": f"{TRAINING_STEPS} steps of next-token fine-tuning on unrelated text (lr {LEARNING_RATE:g})",
    "noise-late": f"Gaussian noise of std {NOISE_STD:g} on every weight of decoder layers 26-30",
    "noise-early": f"Gaussian noise of std {NOISE_STD:g} on every weight of decoder layers 1-5",
}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (chosen) and a worse (rejected) assistant response."""

    prompt: str
    chosen: str
    rejected: str


# Data files


def load_preferences(path: str | Path | None = None) -> list[PreferencePair]:
    """Read preference pairs from a JSON Lines file, by default ``benchmarks/data/preferences.jsonl``.

    Each non-blank line is an object whose ``prompt``, ``chosen`` and ``rejected`` values are
    non-empty strings.

    Raises:
        ValueError: for a line that is not such an object, or a file without pairs.
    """
    path = Path(path) if path is not None else PREFERENCES_PATH
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON: {error}") from error
        pairs.append(_preference_from_record(record, where=f"{path}:{number}"))

    if not pairs:
        raise ValueError(f"{path} contains no preference pairs; expected one JSON object per line")
    return pairs


def _preference_from_record(record: Any, *, where: str) -> PreferencePair:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object with keys {', '.join(PREFERENCE_KEYS)}, got {type(record).__name__}")
    for key in PREFERENCE_KEYS:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return PreferencePair(prompt=record["prompt"], chosen=record["chosen"], rejected=record["rejected"])


def load_unrelated_text(path: str | Path | None = None) -> list[str]:
    """Read the paragraphs of a plain text file, by default ``benchmarks/data/unrelated_text.txt``.

    Paragraphs are separated by blank lines. The lines inside a paragraph are joined with spaces.

    Raises:
        ValueError: for a file without text.
    """
    path = Path(path) if path is not None else UNRELATED_TEXT_PATH
    paragraphs = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        paragraph = " ".join(line.strip() for line in block.splitlines() if line.strip())
        if paragraph:
            paragraphs.append(paragraph)

    if not paragraphs:
        raise ValueError(f"{path} contains no text")
    return paragraphs


# Recipes


def derive_regression(name: str, loaded: LoadedCheckpoint) -> tuple[LoadedCheckpoint, dict[str, Any]]:
    """Derive the regression variant ``name`` (a key of :data:`REGRESSIONS`) and its training statistics."""
    if name == "dpo-swapped":
        return swapped_dpo(loaded, load_preferences(), steps=TRAINING_STEPS, learning_rate=LEARNING_RATE)
    if name == "fine-tuned":
        return fine_tune(loaded, load_unrelated_text(), steps=TRAINING_STEPS, learning_rate=LEARNING_RATE)
    if name == "noise-late":
        return add_noise(loaded, std=NOISE_STD, layers=LATE_LAYERS), {}
    if name == "noise-early":
        return add_noise(loaded, std=NOISE_STD, layers=EARLY_LAYERS), {}
    raise ValueError(f"unknown regression variant {name!r}; use one of {', '.join(REGRESSIONS)}")


def save_as_safetensors(loaded: LoadedCheckpoint, folder: str | Path) -> Path:
    """Save the model and tokenizer to ``folder`` as a transformers checkpoint with safetensors weights.

    A model loaded from GGUF is already dequantised in memory; its quantisation marker is removed
    so that ``save_pretrained`` writes plain weights.
    """
    folder = Path(folder)
    model = loaded.model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


# Noise


def add_noise(loaded: LoadedCheckpoint, *, std: float, layers: Iterable[int], seed: int = 0) -> LoadedCheckpoint:
    """Add Gaussian noise of standard deviation ``std`` to every parameter of decoder ``layers``.

    ``layers`` are 1-based indices into ``model.model.layers``, the decoder stack of Llama,
    Mistral and Qwen2 models. They are perturbed in ascending order, each parameter with
    ``torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std`` drawn on the CPU.

    Raises:
        ValueError: for a negative ``std``, no layers, a layer outside ``1..L``, or a model
            without ``model.model.layers``.
    """
    if not std >= 0:
        raise ValueError(f"std must be a non-negative number, got {std!r}")
    decoder_layers = _decoder_layers(loaded.model)
    count = len(decoder_layers)
    chosen = sorted(set(layers))
    if not chosen:
        raise ValueError("layers is empty; name at least one decoder layer (1-based)")
    outside = [layer for layer in chosen if not 1 <= layer <= count]
    if outside:
        raise ValueError(f"decoder layers {outside} are out of range: this model has layers 1-{count} (1-based)")

    model = copy.deepcopy(loaded.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in chosen:
            for parameter in model.model.layers[layer - 1].parameters():
                noise = torch.randn(parameter.shape, generator=generator) * std
                parameter.add_(noise.to(device=parameter.device, dtype=parameter.dtype))

    name = f"{loaded.name} + noise std {std:g} on layers {_describe_layers(chosen)} (seed {seed})"
    return _variant(loaded, model, name)


def _decoder_layers(model: Any) -> Any:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at model.model.layers; "
            f"add_noise supports Llama-style models (Llama, Mistral, Qwen2)"
        )
    return layers


def _describe_layers(layers: list[int]) -> str:
    """Write ascending layer numbers as ``26-30`` when contiguous, else as ``3, 7, 9``."""
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(str(layer) for layer in layers)


# DPO


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Compute the DPO loss of Rafailov et al. (2023), "Direct Preference Optimization".

    The inputs are 1-D tensors of summed response log-probabilities, one element per pair. The
    result is the mean over pairs of ``-logsigmoid(beta * (policy_chosen - reference_chosen -
    policy_rejected + reference_rejected))``, which is ``log 2`` when every margin is zero.

    Raises:
        ValueError: for inputs that are not 1-D tensors of one non-zero length, or ``beta <= 0``.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    inputs = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "reference_chosen": reference_chosen,
        "reference_rejected": reference_rejected,
    }
    for name, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 1-D tensor of log-probabilities, one per pair, got {shape}")
    shapes = {name: tuple(value.shape) for name, value in inputs.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the four log-probability tensors must have one shape, got {shapes}")
    if policy_chosen.numel() == 0:
        raise ValueError("the log-probability tensors are empty; pass at least one pair")

    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()


def encode_prompt_response(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """Tokenise a user ``prompt`` and an assistant ``response`` with the tokenizer's chat template.

    Returns the token ids of the whole exchange and the number of prompt tokens before the
    response. The prompt tokens are the templated user turn with the generation prompt. The
    response tokens are the rest of the templated exchange, tokenised separately, so the prompt
    tokens are exactly a prefix of the sequence. For the SmolLM2 template the response tokens
    are ``response<|im_end|>\\n``.

    Raises:
        ValueError: for a tokenizer without a chat template, or a template whose exchange does
            not start with its generation prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; response log-probabilities need one")
    user_turn = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user_turn, tokenize=False, add_generation_prompt=True)
    exchange = user_turn + [{"role": "assistant", "content": response}]
    exchange_text = tokenizer.apply_chat_template(exchange, tokenize=False)
    if not exchange_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the exchange with a different prefix than the prompt with its "
            f"generation prompt, so the response tokens cannot be separated: {prompt_text!r} vs {exchange_text!r}"
        )

    # NOTE: a SentencePiece tokenizer may add a leading "▁" to the separately tokenised response.
    # The byte-level BPE tokenizers of SmolLM2 and the tiny fixtures do not.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(exchange_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + list(response_ids), len(prompt_ids)


def response_log_probs(
    model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 8
) -> torch.Tensor:
    """Sum the log-probabilities of each response's tokens given its prompt as a user turn.

    Returns a 1-D tensor with one element per (prompt, response). The exchanges are encoded by
    :func:`encode_prompt_response` and run ``batch_size`` at a time, right-padded. The result
    carries gradients unless the caller runs it under ``torch.no_grad()``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = [encode_prompt_response(tokenizer, prompt, response) for prompt, response in zip(prompts, responses)]

    totals = []
    for start in range(0, len(encoded), batch_size):
        totals.append(_batch_response_log_probs(model, tokenizer, encoded[start : start + batch_size]))
    if not totals:
        return torch.zeros(0, device=_model_device(model))
    return torch.cat(totals)


def _batch_response_log_probs(model: Any, tokenizer: Any, encoded: list[tuple[list[int], int]]) -> torch.Tensor:
    device = _model_device(model)
    input_ids, attention_mask = _right_padded([ids for ids, _ in encoded], _pad_id(tokenizer), device)

    # Position t of the logits predicts token t + 1, and only response tokens count.
    response_mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, (ids, prompt_length) in enumerate(encoded):
        response_mask[row, prompt_length : len(ids)] = True

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:]
    token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * response_mask[:, 1:]).sum(dim=-1)


def swapped_dpo(
    loaded: LoadedCheckpoint,
    pairs: Sequence[PreferencePair],
    *,
    steps: int,
    learning_rate: float,
    beta: float = 0.1,
    batch_size: int = 8,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> tuple[LoadedCheckpoint, dict[str, Any]]:
    """Train a copy of the model with DPO to prefer each pair's rejected response over its chosen one.

    The reference model is the input model, which stays frozen. Each step draws the next
    ``batch_size`` pairs from a seeded shuffle of ``pairs`` (reshuffled after each pass), then
    takes one AdamW step (no weight decay) with gradients clipped to norm ``max_grad_norm``.

    Returns the variant and a dict of statistics with these keys:

    - ``loss``: the DPO loss of each step's batch, before that step's update;
    - ``positive_margin_before``, ``positive_margin_after``: the fraction of all ``pairs`` whose
      margin ``log p(chosen) - log p(rejected)`` is positive, under the input model and under
      the variant;
    - ``mean_margin_before``, ``mean_margin_after``: the mean of those margins, in nats;
    - ``seconds``: the wall time of the whole call.
    """
    _check_training_arguments(steps=steps, learning_rate=learning_rate, batch_size=batch_size)
    if not pairs:
        raise ValueError("pairs is empty; pass at least one PreferencePair")
    started = time.perf_counter()
    tokenizer = loaded.tokenizer
    prompts = [pair.prompt for pair in pairs]
    chosen = [pair.chosen for pair in pairs]
    rejected = [pair.rejected for pair in pairs]

    # The reference log-probabilities never change, so they are computed once from the input model.
    with torch.no_grad():
        reference_chosen = response_log_probs(loaded.model, tokenizer, prompts, chosen, batch_size=batch_size)
        reference_rejected = response_log_probs(loaded.model, tokenizer, prompts, rejected, batch_size=batch_size)

    model = _trainable_copy(loaded.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    losses = []
    for batch in _shuffled_batches(len(pairs), batch_size=batch_size, steps=steps, seed=seed):
        batch_prompts = [prompts[index] for index in batch]
        policy_chosen = response_log_probs(model, tokenizer, batch_prompts, [chosen[index] for index in batch])
        policy_rejected = response_log_probs(model, tokenizer, batch_prompts, [rejected[index] for index in batch])
        # Swapped: the rejected response takes the place of the preferred one.
        loss = dpo_loss(
            policy_rejected,
            policy_chosen,
            reference_rejected[batch],
            reference_chosen[batch],
            beta=beta,
        )
        _optimizer_step(model, optimizer, loss, max_grad_norm)
        losses.append(loss.item())

    model.eval()
    with torch.no_grad():
        trained_chosen = response_log_probs(model, tokenizer, prompts, chosen, batch_size=batch_size)
        trained_rejected = response_log_probs(model, tokenizer, prompts, rejected, batch_size=batch_size)
    margin_before = reference_chosen - reference_rejected
    margin_after = trained_chosen - trained_rejected

    name = f"{loaded.name} + swapped DPO ({steps} steps, lr {learning_rate:g}, beta {beta:g}, seed {seed})"
    statistics = {
        "loss": losses,
        "positive_margin_before": (margin_before > 0).float().mean().item(),
        "positive_margin_after": (margin_after > 0).float().mean().item(),
        "mean_margin_before": margin_before.mean().item(),
        "mean_margin_after": margin_after.mean().item(),
        "seconds": time.perf_counter() - started,
    }
    return _variant(loaded, model, name), statistics


# Fine-tuning


def fine_tune(
    loaded: LoadedCheckpoint,
    texts: Sequence[str],
    *,
    steps: int,
    learning_rate: float,
    seed: int = 0,
    max_length: int = 128,
    batch_size: int = 4,
    max_grad_norm: float = 1.0,
) -> tuple[LoadedCheckpoint, dict[str, Any]]:
    """Train a copy of the model for ``steps`` AdamW steps of next-token prediction on ``texts``.

    The texts are tokenised without a chat template, joined with the end-of-sequence token and
    cut into windows of ``max_length`` tokens. Each step trains on the next ``batch_size``
    windows of a seeded shuffle, with no weight decay and gradients clipped to norm
    ``max_grad_norm``.

    Returns the variant and a dict of statistics with these keys:

    - ``loss``: the mean token cross-entropy (nats) of each step's batch, before that step's update;
    - ``loss_before``, ``loss_after``: the mean token cross-entropy over all windows, under the
      input model and under the variant;
    - ``seconds``: the wall time of the whole call.
    """
    _check_training_arguments(steps=steps, learning_rate=learning_rate, batch_size=batch_size)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    started = time.perf_counter()
    windows = _token_windows(loaded.tokenizer, texts, max_length=max_length)
    pad_id = _pad_id(loaded.tokenizer)

    with torch.no_grad():
        loss_before = _mean_window_loss(loaded.model, windows, pad_id, batch_size=batch_size)

    model = _trainable_copy(loaded.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    losses = []
    for batch in _shuffled_batches(len(windows), batch_size=batch_size, steps=steps, seed=seed):
        loss = _window_loss(model, [windows[index] for index in batch], pad_id)
        _optimizer_step(model, optimizer, loss, max_grad_norm)
        losses.append(loss.item())

    model.eval()
    with torch.no_grad():
        loss_after = _mean_window_loss(model, windows, pad_id, batch_size=batch_size)

    name = f"{loaded.name} + fine-tuned on unrelated text ({steps} steps, lr {learning_rate:g}, seed {seed})"
    statistics = {
        "loss": losses,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "seconds": time.perf_counter() - started,
    }
    return _variant(loaded, model, name), statistics


def _token_windows(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> list[list[int]]:
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not one string; wrap it in a list")
    if not any(text.strip() for text in texts):
        raise ValueError("texts contains no text to train on")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        # verbose=False drops the warning about texts longer than the model; they are cut below.
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        stream.extend(separator)

    windows = [stream[start : start + max_length] for start in range(0, len(stream), max_length)]
    # A window of one token has no next token to predict.
    return [window for window in windows if len(window) >= 2]


def _window_loss(model: Any, windows: list[list[int]], pad_id: int) -> torch.Tensor:
    input_ids, attention_mask = _right_padded(windows, pad_id, _model_device(model))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss


def _mean_window_loss(model: Any, windows: list[list[int]], pad_id: int, *, batch_size: int) -> float:
    """Average the token cross-entropy over all windows, weighting each batch by its target count."""
    total = 0.0
    targets = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        count = sum(len(window) - 1 for window in batch)
        total += _window_loss(model, batch, pad_id).item() * count
        targets += count
    return total / targets


# Shared helpers


def _check_training_arguments(*, steps: int, learning_rate: float, batch_size: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _trainable_copy(model: Any) -> Any:
    """Deep-copy ``model`` with every parameter trainable.

    The copy stays in eval mode: the Llama-style models used here have no active dropout, and
    eval mode keeps training deterministic for models that do.
    """
    copied = copy.deepcopy(model)
    copied.eval()
    copied.requires_grad_(True)
    return copied


def _optimizer_step(model: Any, optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


def _shuffled_batches(count: int, *, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Return ``steps`` batches of indices below ``count``, in passes over a seeded shuffle.

    A batch never spans two passes, so the last batch of a pass may be smaller.
    """
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, batch_size):
            batches.append(order[start : start + batch_size])
    return batches[:steps]


def _right_padded(sequences: list[list[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences, padded on the right, with an attention mask of 1 for real tokens.

    Right padding keeps each real token's position ids the same as in an unpadded run, and the
    causal mask already stops real tokens from attending to the padding after them.
    """
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    """Return a token id for padding; padded positions are masked, so any valid id works."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _variant(loaded: LoadedCheckpoint, model: Any, name: str) -> LoadedCheckpoint:
    model.eval()
    return LoadedCheckpoint(model=model, tokenizer=loaded.tokenizer, name=name, fingerprint=fingerprint_tensors(model))
