"""The ``spinal_trace`` fixture traces a checkpoint once per session and settings."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from collections import Counter

TEN_TESTS_MODULE = """
import pytest

FIRST = []


@pytest.mark.parametrize("index", range(10))
def test_trace(spinal_trace, index):
    trace = spinal_trace("model")
    FIRST.append(trace)
    assert trace is FIRST[0]
"""

SETTINGS_MODULE = """
from pytest_spinal import TraceSettings, load_probes


def test_default_settings(spinal_trace):
    spinal_trace("model")


def test_wider_tail_window(spinal_trace):
    spinal_trace("model", settings=TraceSettings(tail_window=(0.4, 0.9)))


def test_default_settings_again(spinal_trace):
    spinal_trace("model", settings=TraceSettings())


def test_other_probes(spinal_trace):
    spinal_trace("model", probes=load_probes().prompts[12:24])
"""


def trace_events(junit_xml) -> Counter:
    """Count the ``spinal_trace`` events (computed or cached) in a JUnit XML report."""
    events = Counter()
    for element in ElementTree.parse(junit_xml).iter("property"):
        if element.get("name") == "spinal_trace":
            events[json.loads(element.get("value"))["event"]] += 1
    return events


def test_ten_tests_trace_once(project):
    project.makepyfile(test_cache=TEN_TESTS_MODULE)

    result = project.runpytest("--junitxml=report.xml")

    result.assert_outcomes(passed=10)
    result.stdout.fnmatch_lines(["traces: 1 computed, 9 served from the session cache"])
    assert trace_events(project.path / "report.xml") == Counter(computed=1, cached=9)


def test_other_settings_trace_again(project):
    project.makepyfile(test_settings=SETTINGS_MODULE)

    result = project.runpytest("--junitxml=report.xml")

    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["traces: 3 computed, 1 served from the session cache"])
    assert trace_events(project.path / "report.xml") == Counter(computed=3, cached=1)
