"""``--spinal-report DIR``: a PNG per gate comparison and DIR/index.html, also under pytest-xdist."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from png_files import png_size

#: Two gates on the project's tiny llama. test_late_layers compares twice: first with a wide
#: transport tolerance that the drifted model passes, then on the late band with the defaults.
GATE_MODULE = """
from pytest_spinal import Tolerance


def test_whole_trace(spinal_trace, spinal_baseline):
    spinal_baseline.assert_close(spinal_trace("model"))


def test_late_layers(spinal_trace, spinal_baseline):
    trace = spinal_trace("model")
    spinal_baseline.assert_close(trace, transport=Tolerance(atol=1.0), contraction=Tolerance(atol=1.0))
    spinal_baseline.assert_close(trace, layers="late")
"""

#: Gates that need no model: assert_trace_close on synthetic traces, one of them out of tolerance.
SYNTHETIC_MODULE = """
import pytest

from pytest_spinal import DepthTrace, TraceSettings, assert_trace_close


def make_trace(last_transport):
    return DepthTrace(
        contraction=(1.0, 0.9, 0.8, 0.7, 0.6),
        transport=(0.5, 0.4, 0.3, last_transport),
        transport_per_prompt=(),
        settings=TraceSettings(),
        probes={"fingerprint": "sha256:0"},
        checkpoint={"name": "synthetic", "dtype": "float32"},
        environment={},
    )


@pytest.mark.parametrize("rise", [0.0, 0.001, 0.002, 0.5])
def test_gate(rise):
    assert_trace_close(make_trace(0.2 + rise), make_trace(0.2))
"""

#: Seconds one subprocess run may take: two xdist workers start and import matplotlib.
RUN_TIMEOUT = 120


@pytest.fixture(scope="module", autouse=True)
def preloaded_plotting_modules(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Import and use matplotlib in this process before any in-process pytest run.

    ``pytester.runpytest`` removes the modules that an inner session imported once it ends.
    Drawing one image here loads every module that drawing needs, so none is imported twice.
    """
    from pytest_spinal import DepthTrace, TraceSettings
    from pytest_spinal.html_report import write_index  # noqa: F401
    from pytest_spinal.plots import draw_trace

    trace = DepthTrace(
        contraction=(1.0, 0.9),
        transport=(0.5,),
        transport_per_prompt=(),
        settings=TraceSettings(),
        probes={},
        checkpoint={},
        environment={},
    )
    draw_trace(trace).save(tmp_path_factory.mktemp("warm-up") / "trace.png")


def read_index(directory: Path) -> str:
    return html.unescape((directory / "index.html").read_text(encoding="utf-8"))


def image_names(index: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index)


def test_report_draws_each_gate(project, replace_model, drifted_llama):
    project.makepyfile(test_gates=GATE_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=2)
    replace_model(drifted_llama)

    result = project.runpytest("--spinal-report", "report")

    result.assert_outcomes(failed=2)
    report = project.path / "report"
    index = read_index(report)
    images = image_names(index)
    assert len(images) == 3
    assert sorted(images) == sorted(path.name for path in report.glob("*.png"))
    for name in images:
        assert png_size(report / name) == (1000, 450)
    assert "test_gates.py::test_whole_trace" in index
    assert "test_gates.py::test_late_layers" in index
    result.stdout.fnmatch_lines(["=* spinal =*", f"report: {report / 'index.html'}"])


def test_report_index_summary_rows(project, replace_model, drifted_llama):
    project.makepyfile(test_gates=GATE_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=2)
    replace_model(drifted_llama)

    project.runpytest("--spinal-report", "report")

    index = read_index(project.path / "report")
    rows = re.findall(r"<tr class=\"(\w+)\"><td><a href=\"#gate-\d+\">([^<]+)</a></td>", index)
    assert rows == [
        ("failed", "test_gates.py::test_late_layers"),
        ("failed", "test_gates.py::test_whole_trace"),
        ("passed", "test_gates.py::test_late_layers"),
    ]
    assert "3 gates: 2 failed, 1 passed." in index
    assert "<td>transport</td><td>3->4</td>" in index


def test_report_while_recording_lists_gates(project):
    project.makepyfile(test_gates=GATE_MODULE)

    result = project.runpytest("--spinal-update", "--spinal-report", "report")

    result.assert_outcomes(passed=2)
    index = read_index(project.path / "report")
    assert image_names(index) == []
    assert index.count("Recorded as the baseline, so nothing was compared.") == 3


def test_report_without_gates(project):
    project.makepyfile(test_plain="def test_nothing():\n    pass\n")

    result = project.runpytest("--spinal-report", "report")

    result.assert_outcomes(passed=1)
    assert "No gate ran" in read_index(project.path / "report")


def test_report_without_matplotlib_text_only(project, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    project.makepyfile(test_synthetic=SYNTHETIC_MODULE)

    result = project.runpytest("--spinal-report", "report")

    result.assert_outcomes(passed=3, failed=1)
    report = project.path / "report"
    index = read_index(report)
    assert list(report.glob("*.png")) == []
    assert image_names(index) == []
    assert "pip install matplotlib" in index
    assert "<td>transport</td><td>3->4</td>" in index
    assert index.count("Every compared layer is within tolerance.") == 3


def test_report_unmoved_gate_names_no_layer(project, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    project.makepyfile(test_synthetic=SYNTHETIC_MODULE)

    project.runpytest("--spinal-report", "report")

    index = read_index(project.path / "report")
    row = re.search(r"test_synthetic.py::test_gate\[0.0\]</a></td>(.*?)</tr>", index).group(1)
    assert row == '<td>synthetic</td><td>-</td><td class="number">0.00</td><td>passed</td>'


def test_report_path_is_file_usage_error(project):
    project.makepyfile(test_plain="def test_nothing():\n    pass\n")
    (project.path / "report").write_text("not a folder\n", encoding="utf-8")

    result = project.runpytest("--spinal-report", "report")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--spinal-report report is a file, but the report needs a folder*"])


def test_report_under_xdist(project):
    project.makepyfile(test_synthetic=SYNTHETIC_MODULE)

    result = project.runpytest_subprocess("-p", "xdist", "-n", "2", "--spinal-report", "report", timeout=RUN_TIMEOUT)

    result.assert_outcomes(passed=3, failed=1)
    report = project.path / "report"
    index = read_index(report)
    images = image_names(index)
    assert len(images) == 4
    for name in images:
        assert png_size(report / name) == (1000, 450)
    assert "4 gates: 1 failed, 3 passed." in index
    for rise in ("0.0", "0.001", "0.002", "0.5"):
        assert f"test_synthetic.py::test_gate[{rise}]" in index
    assert len(re.findall(r"^=+ spinal =+$", result.stdout.str(), flags=re.MULTILINE)) == 1


def test_plugin_import_skips_matplotlib():
    completed = subprocess.run(
        [sys.executable, "-c", "import sys, pytest_spinal.plugin; print('matplotlib' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )

    assert completed.stdout.strip() == "False"
