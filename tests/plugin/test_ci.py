"""While the CI environment variable is set (to anything but empty, 0, false or no), no baseline is written."""

from __future__ import annotations

import pytest

GATE_MODULE = """
def test_gate(spinal_trace, spinal_baseline):
    spinal_baseline.assert_close(spinal_trace("model"))
"""


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_update_under_ci_is_usage_error(project, monkeypatch, value):
    project.makepyfile(test_gate=GATE_MODULE)
    monkeypatch.setenv("CI", value)

    result = project.runpytest("--spinal-update")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --spinal-update writes baselines, which is not allowed while the CI environment variable is set*"]
    )
    assert not (project.path / "baselines").exists()


@pytest.mark.parametrize("value", ["", "false"])
def test_update_with_ci_off_writes(project, monkeypatch, value):
    project.makepyfile(test_gate=GATE_MODULE)
    monkeypatch.setenv("CI", value)

    result = project.runpytest("--spinal-update")

    result.assert_outcomes(passed=1)
    assert (project.path / "baselines" / "test_gate" / "test_gate.json").is_file()


def test_missing_baseline_under_ci_fails(project, monkeypatch):
    project.makepyfile(test_gate=GATE_MODULE)
    monkeypatch.setenv("CI", "true")

    result = project.runpytest()

    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no baseline at *test_gate.json; record it with `pytest --spinal-update test_gate.py::test_gate`*"])
    assert not (project.path / "baselines").exists()
