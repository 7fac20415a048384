"""The spinal block of the terminal summary, and the gate records in JUnit XML."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree

import pytest

from pytest_spinal.summary import MAX_SUMMARY_ROWS

#: A steady gate and one whose transport 3->4 rises by DRIFT (0 while recording).
REPORT_MODULE = """
import os

import pytest

from pytest_spinal import DepthTrace, TraceSettings


def make_trace(last_transport):
    return DepthTrace(
        contraction=(1.0, 0.9, 0.8, 0.7, 0.6),
        transport=(0.5, 0.4, 0.3, last_transport),
        transport_per_prompt=((0.5, 0.4, 0.3, last_transport),),
        settings=TraceSettings(),
        probes={"fingerprint": "sha256:0"},
        checkpoint={"name": "synthetic", "dtype": "float32"},
        environment={},
    )


def test_steady(spinal_baseline):
    spinal_baseline.assert_close(make_trace(0.2))


def test_drifting(spinal_baseline):
    spinal_baseline.assert_close(make_trace(0.2 + float(os.environ["DRIFT"])))
"""


@pytest.fixture
def report_project(project, monkeypatch):
    """A project whose two gates are recorded, and whose drifting gate then rises by 0.0153.

    The baselines have no spread, so the default tolerance is its floor, atol 0.015, and 0.0153
    is 1.02 times the allowed change.
    """
    project.makepyfile(test_report=REPORT_MODULE)
    monkeypatch.setenv("DRIFT", "0")
    project.runpytest("--spinal-update").assert_outcomes(passed=2)
    monkeypatch.setenv("DRIFT", "0.0153")
    return project


def test_summary_counts_gates(report_project):
    result = report_project.runpytest()

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["=* spinal =*", "2 gates: 1 failed, 1 passed"])


def test_summary_header_names_columns(report_project):
    result = report_project.runpytest()

    result.stdout.fnmatch_lines(["test *checkpoint *worst layer *worst |delta|/allowed *verdict"])


def test_summary_lists_failed_gate_first(report_project):
    result = report_project.runpytest()

    rows = [line for line in result.stdout.lines if line.startswith("test_report.py::")]
    assert [row.split()[0] for row in rows] == ["test_report.py::test_drifting", "test_report.py::test_steady"]


def test_summary_row_of_unmoved_gate(report_project):
    # The steady trace equals its baseline, so no layer is the worst.
    result = report_project.runpytest()

    row = next(line for line in result.stdout.lines if line.startswith("test_report.py::test_steady "))
    assert re.fullmatch(r"test_report.py::test_steady +synthetic +- +0\.00 +passed", row)


def test_summary_row_of_failed_gate(report_project):
    result = report_project.runpytest()

    row = next(line for line in result.stdout.lines if line.startswith("test_report.py::test_drifting "))
    assert re.fullmatch(r"test_report.py::test_drifting +synthetic +transport 3->4 +1\.02 +failed", row)


def test_summary_rows_while_recording(project, monkeypatch):
    project.makepyfile(test_report=REPORT_MODULE)
    monkeypatch.setenv("DRIFT", "0")

    result = project.runpytest("--spinal-update")

    row = next(line for line in result.stdout.lines if line.startswith("test_report.py::test_steady "))
    assert re.fullmatch(r"test_report.py::test_steady +synthetic +- +- +recorded \(written\)", row)
    result.stdout.fnmatch_lines(["2 gates: 2 recorded"])


MANY_GATES_MODULE = f"""
import pytest

from pytest_spinal import DepthTrace, TraceSettings


@pytest.mark.parametrize("index", range({MAX_SUMMARY_ROWS + 5}))
def test_gate(spinal_baseline, index):
    spinal_baseline.assert_close(
        DepthTrace(
            contraction=(1.0, 0.9),
            transport=(0.5,),
            transport_per_prompt=((0.5,),),
            settings=TraceSettings(),
            probes={{"fingerprint": "sha256:0"}},
            checkpoint={{"name": "synthetic", "dtype": "float32"}},
            environment={{}},
        )
    )
"""


def test_summary_caps_gate_rows(project):
    project.makepyfile(test_many=MANY_GATES_MODULE)

    result = project.runpytest("--spinal-update")

    rows = [line for line in result.stdout.lines if line.startswith("test_many.py::")]
    assert len(rows) == MAX_SUMMARY_ROWS
    result.stdout.fnmatch_lines(["... and 5 more gates"])


def junit_properties(path, test_name: str) -> dict[str, list[dict]]:
    """Return the spinal properties of one test case in a JUnit XML report, parsed from JSON."""
    properties: dict[str, list[dict]] = {}
    for case in ElementTree.parse(path).iter("testcase"):
        if case.get("name") != test_name:
            continue
        for element in case.iter("property"):
            if element.get("name", "").startswith("spinal_"):
                properties.setdefault(element.get("name"), []).append(json.loads(element.get("value")))
    return properties


def test_junit_records_failed_gate(report_project):
    report_project.runpytest("--junitxml=report.xml")

    properties = junit_properties(report_project.path / "report.xml", "test_drifting")
    assert properties["spinal_gate"] == [
        {
            "baseline": "baselines/test_report/test_drifting.json",
            "checkpoint": "synthetic",
            "notes": ["baselines/test_report/test_drifting.json has no spread, so the auto tolerances used their fixed part only"],
            "verdict": "failed",
            "worst_excess": 1.02,
            "worst_layer": "transport 3->4",
        }
    ]


def test_junit_records_baseline_path(report_project):
    report_project.runpytest("--junitxml=report.xml")

    properties = junit_properties(report_project.path / "report.xml", "test_steady")
    baseline = str(report_project.path / "baselines" / "test_report" / "test_steady.json")
    assert {"path": baseline, "action": "compared"} in properties["spinal_baseline"]


def test_nested_session_keeps_gates_inside(report_project, request):
    # pytester runs the inner session in this process; its gates belong to its own tests only.
    report_project.runpytest()

    outer_gates = [value for name, value in request.node.user_properties if name == "spinal_gate"]
    assert outer_gates == []
