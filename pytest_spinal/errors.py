"""Exceptions raised by pytest-spinal, each for one kind of bad input."""

from __future__ import annotations


class SpinalError(Exception):
    """Base class of every error pytest-spinal raises on purpose."""


class CheckpointError(SpinalError):
    """A checkpoint is missing, unreadable or cannot be loaded."""


class UnsupportedModelError(SpinalError):
    """A model has no causal-LM output head or final normalisation that the logit lens can use."""


class ProbeError(SpinalError):
    """A probe set is missing, empty or malformed."""


class TraceError(SpinalError):
    """A trace cannot be computed: non-finite hidden states, too few tokens, bad settings."""


class TraceFileError(SpinalError):
    """A depth-trace JSON file is unreadable, corrupt, or of an unknown schema."""
