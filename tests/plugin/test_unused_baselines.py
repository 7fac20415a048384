"""Baseline files that no test used: listed after a full run, deleted by ``--spinal-prune``."""

from __future__ import annotations

import shutil

import pytest

#: Two gates on synthetic traces, so that these tests need no model.
GATES_MODULE = """
from pytest_spinal import DepthTrace, TraceSettings


def make_trace():
    return DepthTrace(
        contraction=(1.0, 0.9, 0.8, 0.7, 0.6),
        transport=(0.5, 0.4, 0.3, 0.2),
        transport_per_prompt=((0.5, 0.4, 0.3, 0.2),),
        settings=TraceSettings(),
        probes={"fingerprint": "sha256:0"},
        checkpoint={"name": "synthetic", "dtype": "float32"},
        environment={},
    )


def test_first(spinal_baseline):
    spinal_baseline.assert_close(make_trace())


def test_second(spinal_baseline):
    spinal_baseline.assert_close(make_trace())
"""

STRAY = "baselines/test_removed/test_old_gate.json"


@pytest.fixture
def gates(project):
    """A project with two recorded gates and one stray baseline that no test uses."""
    project.makepyfile(test_gates=GATES_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=2)
    stray = project.path / STRAY
    stray.parent.mkdir()
    shutil.copy(project.path / "baselines" / "test_gates" / "test_first.json", stray)
    return project


def test_full_run_lists_stray_baseline(gates):
    result = gates.runpytest()

    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "1 baseline not used by any test:",
            f"  {STRAY}",
            "delete them with --spinal-prune",
        ]
    )


def test_selection_lists_no_baseline(gates):
    result = gates.runpytest("-k", "first")

    result.assert_outcomes(passed=1, deselected=1)
    assert "not used by any test" not in result.stdout.str()


def test_prune_deletes_after_full_run(gates):
    result = gates.runpytest("--spinal-prune")

    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["deleted 1 unused baseline"])
    assert not (gates.path / STRAY).exists()
    assert (gates.path / "baselines" / "test_gates" / "test_first.json").exists()
    assert (gates.path / "baselines" / "test_gates" / "test_second.json").exists()


def test_prune_under_ci_deletes_nothing(gates, monkeypatch):
    monkeypatch.setenv("CI", "true")

    result = gates.runpytest("--spinal-prune")

    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["--spinal-prune did nothing: files are never deleted while the CI environment variable is set"]
    )
    assert (gates.path / STRAY).exists()


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["-k", "first"], "tests were selected with -k"),
        (["--deselect", "test_gates.py::test_second"], "some tests were deselected"),
        (["test_gates.py"], "test paths were given on the command line"),
    ],
    ids=["keyword", "deselect", "path"],
)
def test_prune_after_partial_run_deletes_nothing(gates, arguments, reason):
    result = gates.runpytest("--spinal-prune", *arguments)

    result.stdout.fnmatch_lines(
        [f"--spinal-prune did nothing: {reason}; unused baselines are only known after a full, passing run"]
    )
    assert (gates.path / STRAY).exists()


def test_prune_after_failure_deletes_nothing(gates):
    (gates.path / "baselines" / "test_gates" / "test_second.json").unlink()

    result = gates.runpytest("--spinal-prune")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["--spinal-prune did nothing: some tests failed or errored; unused baselines are only known after a full, passing run"]
    )
    assert (gates.path / STRAY).exists()


def test_prune_keeps_skipped_gate_baseline(gates):
    # A gate skipped on this machine (for example one that needs a GPU) still owns its baseline.
    skipped_module = GATES_MODULE.replace(
        "def test_second(", "import pytest\n\n\n@pytest.mark.skip(reason='needs a GPU')\ndef test_second("
    )
    gates.makepyfile(test_gates=skipped_module)

    result = gates.runpytest("--spinal-prune")

    result.assert_outcomes(passed=1, skipped=1)
    assert (gates.path / "baselines" / "test_gates" / "test_second.json").exists()
