"""Gates under pytest-xdist: workers record and compare, the controller prints one summary."""

from __future__ import annotations

import re

from pytest_spinal import DepthTrace

GATES = 200

MANY_GATES_MODULE = f"""
import pytest


@pytest.mark.parametrize("index", range({GATES}))
def test_gate(spinal_trace, spinal_baseline, index):
    spinal_baseline.assert_close(spinal_trace("model"))
"""

#: Seconds one subprocess run of the suite may take: 4 workers each import torch and trace once.
RUN_TIMEOUT = 300


def summary_headers(output: str) -> list[str]:
    return re.findall(r"^=+ spinal =+$", output, flags=re.MULTILINE)


def test_xdist_records_then_compares(project):
    project.makepyfile(test_many=MANY_GATES_MODULE)

    recorded = project.runpytest_subprocess("-p", "xdist", "-n", "4", "--spinal-update", timeout=RUN_TIMEOUT)

    recorded.assert_outcomes(passed=GATES)
    files = sorted((project.path / "baselines" / "test_many").glob("*.json"))
    assert len(files) == GATES
    traces = [DepthTrace.load(path) for path in files]
    assert all(trace.num_layers == 4 for trace in traces)
    output = recorded.stdout.str()
    assert len(summary_headers(output)) == 1
    assert f"{GATES} gates: {GATES} recorded" in output
    assert f"baselines: {GATES} written, 0 unchanged" in output
    assert list(project.path.rglob(".*.tmp")) == []

    # The controller learns from the workers' reports which baselines were used, so it can prune.
    stray = project.path / "baselines" / "test_removed" / "test_old_gate.json"
    stray.parent.mkdir()
    stray.write_bytes(files[0].read_bytes())

    compared = project.runpytest_subprocess("-p", "xdist", "-n", "4", "--spinal-prune", timeout=RUN_TIMEOUT)

    compared.assert_outcomes(passed=GATES)
    assert not stray.exists()
    assert len(list((project.path / "baselines").rglob("*.json"))) == GATES
    output = compared.stdout.str()
    assert "deleted 1 unused baseline" in output
    assert len(summary_headers(output)) == 1
    assert f"{GATES} gates: {GATES} passed" in output
    traces_line = re.search(r"^traces: (\d+) computed, (\d+) served from the session cache$", output, flags=re.MULTILINE)
    assert traces_line is not None
    assert 1 <= int(traces_line.group(1)) <= 4
    assert int(traces_line.group(1)) + int(traces_line.group(2)) == GATES
