"""Fixtures shared by the whole suite."""

from __future__ import annotations

import functools

import pytest
from tiny_models import load_tiny_model

# The plugin tests under tests/plugin run inner pytest sessions through the pytester fixture.
pytest_plugins = ("pytester",)


@pytest.fixture(scope="session")
def tiny_model():
    """Return a function that maps a family to its ``(model, tokenizer)``, loaded once per session.

    Every test shares these objects, so a test that changes weights, dtype, device or hooks
    must load its own copy with ``tiny_models.load_tiny_model``.
    """
    return functools.cache(load_tiny_model)
