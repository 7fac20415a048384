"""Baseline files: where a gate's baseline lives, reading it, and recording it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pytest_spinal.trace import DepthTrace

SUFFIX = ".json"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class BaselineMissing(AssertionError):
    """A gate has no baseline file yet."""


def name_for_node(nodeid: str) -> str:
    """Derive a baseline name from a test id: ``tests/test_gate.py::test_a[x]`` becomes ``tests/test_gate/test_a-x``.

    The module's whole path (relative to the rootdir, as in the test id) is kept, so that test
    modules of the same name in different folders get different baselines.
    """
    path, _, test = nodeid.partition("::")
    module = [_safe(part) for part in Path(path).with_suffix("").parts if part not in ("", ".", "..")] or ["tests"]
    test = test.replace("::", ".").replace("[", "-").replace("]", "")
    return "/".join([*module, _safe(test)])


def ci_is_set() -> bool:
    """Return whether the ``CI`` environment variable is set to anything but empty, 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class BaselineStore:
    """The folder of baseline JSON files of one pytest session."""

    root: Path

    def path_for(self, name: str) -> Path:
        """Return the file of baseline ``name`` (a relative path without suffix)."""
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"baseline name {name!r} must be a relative path inside the baseline folder, without '..'")
        return self.root / f"{name}{SUFFIX}"

    def read(self, path: Path, *, update_hint: str) -> DepthTrace:
        """Load a baseline, failing with the command that records it when it is missing."""
        __tracebackhide__ = True
        if not path.exists():
            raise BaselineMissing(
                f"no baseline at {path}; record it with `{update_hint}`, check the result and commit the file"
            )
        return DepthTrace.load(path)

    def write(self, path: Path, trace: DepthTrace) -> str:
        """Record ``trace`` at ``path`` atomically; return ``"written"`` or ``"unchanged"``."""
        if ci_is_set():
            raise RuntimeError("refusing to write a baseline while the CI environment variable is set")
        text = trace.dumps()
        try:
            if path.read_text(encoding="utf-8") == text:
                return "unchanged"
        except (OSError, UnicodeDecodeError):
            pass
        trace.save(path)
        return "written"

    def all_files(self) -> list[Path]:
        """List every baseline file under the folder, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(path for path in self.root.rglob(f"*{SUFFIX}") if path.is_file())


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "baseline"
