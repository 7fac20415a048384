"""pytest-spinal: alignment regression testing of causal language models with SPINAL depth traces.

Importing this package is cheap: torch and transformers load only when a name that needs them
is first used, so the pytest plugin entry point stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_LAZY = {
    "DepthTrace": "pytest_spinal.trace",
    "TraceSettings": "pytest_spinal.trace",
    "TraceSpread": "pytest_spinal.trace",
    "trace_checkpoint": "pytest_spinal.tracing",
    "load_checkpoint": "pytest_spinal.checkpoints",
    "LoadedCheckpoint": "pytest_spinal.checkpoints",
    "load_probes": "pytest_spinal.probes",
    "ProbeSet": "pytest_spinal.probes",
    "Tolerance": "pytest_spinal.tolerance",
    "assert_trace_close": "pytest_spinal.compare",
    "compare_traces": "pytest_spinal.compare",
    "TraceComparison": "pytest_spinal.compare",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from pytest_spinal.checkpoints import LoadedCheckpoint, load_checkpoint
    from pytest_spinal.compare import TraceComparison, assert_trace_close, compare_traces
    from pytest_spinal.tolerance import Tolerance
    from pytest_spinal.probes import ProbeSet, load_probes
    from pytest_spinal.trace import DepthTrace, TraceSettings, TraceSpread
    from pytest_spinal.tracing import trace_checkpoint


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_spinal' has no attribute {name!r}")
    return getattr(import_module(module), name)
