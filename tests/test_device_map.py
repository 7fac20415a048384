"""Loading with a device map through accelerate, for models larger than one GPU.

The test machines have at most one device. These tests check that a device-mapped load traces
like a plain one and that misuse is rejected, but they never split a model over several GPUs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pytest_spinal.checkpoints import dispatched_devices, load_checkpoint
from pytest_spinal.errors import CheckpointError
from pytest_spinal.tracing import trace_checkpoint

from tiny_models import load_tiny_model, tiny_model_path


def test_device_map_trace_matches_plain():
    plain = trace_checkpoint(tiny_model_path("llama"), device="cpu", spread=False)
    mapped = trace_checkpoint(tiny_model_path("llama"), device="cpu", device_map="auto", spread=False)

    assert mapped.contraction == pytest.approx(plain.contraction, abs=1e-6)
    assert mapped.transport == pytest.approx(plain.transport, abs=1e-6)


def test_unknown_device_map_rejected():
    with pytest.raises(CheckpointError, match="device_map 'everywhere' is not supported; use one of auto, balanced"):
        load_checkpoint(tiny_model_path("llama"), device_map="everywhere")


def test_device_map_rejected_for_loaded_model():
    with pytest.raises(CheckpointError, match="device_map applies when a checkpoint is loaded from files"):
        load_checkpoint(load_tiny_model("llama"), device_map="auto")


def test_device_map_needs_accelerate(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "accelerate" else real_find_spec(name, *args))

    with pytest.raises(CheckpointError, match=r"needs the accelerate package: pip install accelerate"):
        load_checkpoint(tiny_model_path("llama"), device_map="auto")


def test_dispatched_devices_lists_several():
    model, _ = load_tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": 1}

    assert dispatched_devices(model) == ["0", "1"]


def test_single_device_map_is_not_dispatched():
    model, _ = load_tiny_model("llama")
    model.hf_device_map = {"": "cpu"}

    assert dispatched_devices(model) == []


def test_dispatched_model_keeps_dtype():
    model, tokenizer = load_tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu:1"}

    loaded = load_checkpoint((model, tokenizer), device="cpu", dtype="float32")
    assert next(loaded.model.parameters()).dtype == torch.float32

    with pytest.raises(CheckpointError, match="cannot be cast to bfloat16; load it in bfloat16"):
        load_checkpoint((model, tokenizer), device="cpu", dtype="bfloat16")
