"""Tests of checkpoint loading, its error messages and checkpoint fingerprints."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pytest_spinal.checkpoints import (
    LoadedCheckpoint,
    fingerprint_tensors,
    load_checkpoint,
    resolve_device,
    torch_dtype,
)
from pytest_spinal.errors import CheckpointError

from tiny_models import load_tiny_model, tiny_model_path

# NOTE: no test here loads a valid .gguf file. Writing one that transformers can load means
# renaming and permuting every llama tensor to the llama.cpp layout and storing the tokenizer in
# GGUF metadata. The SmolLM2 GGUF checkpoint test covers that path instead.


def copy_tiny_model(family: str, destination):
    """Copy the tiny model folder of ``family`` to ``destination`` and return the copy."""
    return shutil.copytree(tiny_model_path(family), destination)


def add_to_one_weight(folder, amount: float) -> None:
    """Add ``amount`` to the first element of the first tensor in ``folder/model.safetensors``."""
    weights_path = folder / "model.safetensors"
    with safe_open(str(weights_path), framework="pt") as stream:
        metadata = stream.metadata()
    tensors = load_file(str(weights_path))
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] += amount
    save_file(tensors, str(weights_path), metadata=metadata)


# Loading


def test_load_folder():
    folder = tiny_model_path("llama")

    loaded = load_checkpoint(folder, device="cpu")

    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.name == str(folder)
    assert loaded.fingerprint.startswith("sha256:")
    assert loaded.model.training is False


def test_load_folder_float32_params():
    loaded = load_checkpoint(tiny_model_path("gpt2"), device="cpu")

    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.float32}


def test_load_bfloat16_params():
    loaded = load_checkpoint(tiny_model_path("llama"), device="cpu", dtype="bfloat16")

    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.bfloat16}


def test_load_model_tokenizer_pair():
    model, tokenizer = load_tiny_model("gpt2")

    loaded = load_checkpoint((model, tokenizer), device="cpu")

    assert loaded.model is model
    assert loaded.tokenizer is tokenizer
    assert loaded.name == "GPT2LMHeadModel"
    assert loaded.fingerprint == fingerprint_tensors(model)


def test_load_loaded_checkpoint_keeps_identity():
    model, tokenizer = load_tiny_model("gpt2")
    original = LoadedCheckpoint(model=model, tokenizer=tokenizer, name="my-gpt2", fingerprint="sha256:0")

    loaded = load_checkpoint(original, device="cpu")

    assert loaded.name == "my-gpt2"
    assert loaded.fingerprint == "sha256:0"


def test_load_tuple_of_three_rejected():
    model, tokenizer = load_tiny_model("gpt2")

    with pytest.raises(CheckpointError, match=r"\(model, tokenizer\) pair, got a tuple of 3"):
        load_checkpoint((model, tokenizer, None), device="cpu")


# Errors


def test_missing_path_named(tmp_path):
    missing = tmp_path / "no-such-model"

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(missing, device="cpu")

    message = str(raised.value)
    assert str(missing) in message
    assert "not found" in message


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tmp_path, device="cpu")

    message = str(raised.value)
    assert str(tmp_path) in message
    assert "no config.json and 0 .gguf files" in message


def test_folder_with_two_gguf_files(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")

    with pytest.raises(CheckpointError, match="no config.json and 2 .gguf files"):
        load_checkpoint(tmp_path, device="cpu")


def test_folder_without_weights(tmp_path):
    shutil.copy(tiny_model_path("llama") / "config.json", tmp_path / "config.json")

    with pytest.raises(CheckpointError, match="has a config.json but no weight files"):
        load_checkpoint(tmp_path, device="cpu")


def test_non_gguf_file_rejected(tmp_path):
    weights = tmp_path / "weights.txt"
    weights.write_text("not weights", encoding="utf-8")

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(weights, device="cpu")

    message = str(raised.value)
    assert str(weights) in message
    assert "not a .gguf file" in message


def test_corrupt_gguf_file(tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"these bytes are no GGUF header" * 4)

    with pytest.raises(CheckpointError, match="could not be loaded"):
        load_checkpoint(weights, device="cpu")


def test_invalid_dtype_lists_choices():
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(tiny_model_path("gpt2"), device="cpu", dtype="float8")

    message = str(raised.value)
    assert "'float8'" in message
    assert "float32, bfloat16, float16" in message


def test_torch_dtype_names():
    assert torch_dtype("bfloat16") is torch.bfloat16


def test_owner_name_path_not_sent_to_hub(tmp_path, monkeypatch):
    # "checkpoints/candidate" has the shape of a hub id, but only "hf:" ids go to the hub.
    monkeypatch.chdir(tmp_path)

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint("checkpoints/candidate", device="cpu")

    message = str(raised.value)
    assert "'checkpoints/candidate' not found" in message
    assert "hf:owner/name" in message


def test_missing_package_names_pip():
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint("pkg:pytest_spinal_no_such_package", device="cpu")

    message = str(raised.value)
    assert "'pytest_spinal_no_such_package' is not installed" in message
    assert "pip install" in message


def test_missing_dotted_package_raises():
    with pytest.raises(CheckpointError, match="not installed"):
        load_checkpoint("pkg:pytest_spinal_no_such_package.weights", device="cpu")


def test_auto_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible, so auto resolves to cuda")

    assert resolve_device("auto") == "cpu"


def test_cuda_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")

    with pytest.raises(CheckpointError, match="sees no CUDA device"):
        resolve_device("cuda")


# Fingerprints


def test_folder_fingerprint_stable_across_loads():
    first = load_checkpoint(tiny_model_path("gpt2"), device="cpu")
    second = load_checkpoint(tiny_model_path("gpt2"), device="cpu")

    assert first.fingerprint == second.fingerprint


def test_folder_fingerprint_ignores_location(tmp_path):
    copy = copy_tiny_model("gpt2", tmp_path / "gpt2")

    original = load_checkpoint(tiny_model_path("gpt2"), device="cpu")
    copied = load_checkpoint(copy, device="cpu")

    assert copied.fingerprint == original.fingerprint


def test_folder_fingerprint_changes_with_weights(tmp_path):
    copy = copy_tiny_model("gpt2", tmp_path / "gpt2")
    add_to_one_weight(copy, 0.5)

    original = load_checkpoint(tiny_model_path("gpt2"), device="cpu")
    changed = load_checkpoint(copy, device="cpu")

    assert changed.fingerprint != original.fingerprint


def test_tensor_fingerprint_stable_across_loads():
    first, _ = load_tiny_model("gpt2")
    second, _ = load_tiny_model("gpt2")

    assert fingerprint_tensors(first) == fingerprint_tensors(second)


def test_tensor_fingerprint_changes_with_weights():
    model, _ = load_tiny_model("gpt2")
    before = fingerprint_tensors(model)

    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] += 0.5

    assert fingerprint_tensors(model) != before


def test_tensor_fingerprint_changes_with_dtype():
    model, _ = load_tiny_model("gpt2")
    before = fingerprint_tensors(model)

    assert fingerprint_tensors(model.to(torch.bfloat16)) != before
