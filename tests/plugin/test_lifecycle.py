"""A gate's life from a missing baseline through recording, drift and re-recording."""

from __future__ import annotations

import re

import pytest

RELEASE_MODULE = """
def test_whole_depth(spinal_trace, spinal_baseline):
    spinal_baseline.assert_close(spinal_trace("model"))


def test_late_layers(spinal_trace, spinal_baseline):
    spinal_baseline.assert_close(spinal_trace("model"), layers="late")
"""

BASELINES = ["test_release/test_late_layers.json", "test_release/test_whole_depth.json"]


def recorded_baselines(project: pytest.Pytester) -> list[str]:
    folder = project.path / "baselines"
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.json"))


def test_missing_baseline_fails(project):
    project.makepyfile(test_release=RELEASE_MODULE)

    result = project.runpytest()

    result.assert_outcomes(failed=2)
    output = result.stdout.str()
    assert "no baseline at " + str(project.path / "baselines" / "test_release" / "test_whole_depth.json") in output
    assert "`pytest --spinal-update test_release.py::test_whole_depth`" in output
    assert "failed (no baseline)" in output
    assert not (project.path / "baselines").exists()


def test_update_writes_one_file_per_test(project):
    project.makepyfile(test_release=RELEASE_MODULE)

    result = project.runpytest("--spinal-update")

    result.assert_outcomes(passed=2)
    assert recorded_baselines(project) == BASELINES
    result.stdout.fnmatch_lines(["baselines: 2 written, 0 unchanged in *baselines"])


def test_lifecycle_record_drift_rerecord(project, drifted_llama, replace_model):
    project.makepyfile(test_release=RELEASE_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=2)

    # Recording the same model again leaves every file as it was.
    again = project.runpytest("--spinal-update")
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["baselines: 0 written, 2 unchanged in *"])

    project.runpytest().assert_outcomes(passed=2)

    # The model changes in its last layer: both gates fail, naming the metric and the layer.
    replace_model(drifted_llama)
    drifted = project.runpytest()
    drifted.assert_outcomes(failed=2)
    output = drifted.stdout.str()
    headline = re.search(
        r"depth trace of model is out of tolerance against baselines/test_release/test_late_layers.json: (.*)",
        output,
    )
    assert headline is not None
    assert re.match(r"(transport|contraction) (rose|fell|moved) in layer 4 ", headline.group(1))
    drifted.stdout.fnmatch_lines(
        [
            "*metric*layer*baseline*observed*delta*allowed*|delta|/allowed",
            "*If this change is intended, re-record the baseline: pytest --spinal-update test_release.py::test_late_layers, with this run's other options",
        ]
    )

    rerecorded = project.runpytest("--spinal-update")
    rerecorded.assert_outcomes(passed=2)
    rerecorded.stdout.fnmatch_lines(["baselines: 2 written, 0 unchanged in *"])

    project.runpytest().assert_outcomes(passed=2)
