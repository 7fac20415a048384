"""The plugin entry point stays light: torch, transformers and scipy load only when a trace is made."""

from __future__ import annotations

import subprocess
import sys

HEAVY_PACKAGES = ("torch", "transformers", "scipy")


def imported_modules(statement: str) -> list[str]:
    """Run ``statement`` in a fresh interpreter under ``-X importtime``; return every module it imported."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    # Each line reads "import time: <self us> | <cumulative us> | <indented module name>".
    modules = []
    for line in completed.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.append(line.rsplit("|", 1)[1].strip())
    return modules


def test_importtime_lists_modules():
    modules = imported_modules("import pytest_spinal.plugin")

    assert "pytest_spinal.plugin" in modules


def test_plugin_import_skips_heavy_packages():
    modules = imported_modules("import pytest_spinal.plugin")

    heavy = sorted({name for name in modules if name.split(".")[0] in HEAVY_PACKAGES})
    assert heavy == []


PROBE_MODULE = """
import sys


def test_heavy_packages_not_loaded():
    loaded = sorted(name for name in ("torch", "transformers", "scipy") if name in sys.modules)
    assert loaded == []
"""


def test_session_without_trace_skips_heavy_packages(pytester):
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_light=PROBE_MODULE)

    result = pytester.runpytest_subprocess()

    result.stdout.fnmatch_lines(["plugins: *spinal-*"])
    result.assert_outcomes(passed=1)
