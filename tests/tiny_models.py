"""The tiny random-weight models under fixtures/tiny, one per supported model family.

Test modules import these names from here rather than from conftest.py: the sub-folders of
tests/ have conftest.py files of their own, and pytest keeps only one module named ``conftest``
in ``sys.modules`` at a time.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODELS_ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "tiny"

#: One tiny model per supported ``model_type``: 4 decoder layers, hidden size 64, 512 tokens.
TINY_FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "gemma2"]


def tiny_model_path(family: str) -> Path:
    """Return the folder of the tiny model of ``family``."""
    return TINY_MODELS_ROOT / family


def load_tiny_model(family: str):
    """Load a fresh ``(model, tokenizer)`` of ``family`` in float32, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_path(family)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)
