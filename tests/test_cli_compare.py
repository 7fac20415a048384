"""Tests of ``spinal plot`` and ``spinal compare``, and of the band shares that compare reports."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from pytest_spinal import load_probes, trace_checkpoint
from pytest_spinal.cli import main
from pytest_spinal.difference import band_shares
from pytest_spinal.plots import PLOT_INSTALL_HINT
from pytest_spinal.trace import DepthTrace, TraceSettings

from cli_tables import table_rows
from png_files import png_size
from tiny_models import tiny_model_path

#: Contraction drop and transport rise added to the last layer (4) of the tiny llama's trace.
LATE_CHANGE = 0.25


@pytest.fixture(scope="module")
def trace_files(tmp_path_factory) -> dict[str, str]:
    """JSON files of the tiny llama's trace (``base``), a copy changed in layer 4 only
    (``aligned``), and a trace over 12 of the probes (``other_probes``)."""
    folder = tmp_path_factory.mktemp("traces")
    base = trace_checkpoint(tiny_model_path("llama"), device="cpu")
    contraction = list(base.contraction)
    contraction[4] -= LATE_CHANGE
    transport = list(base.transport)
    transport[3] += LATE_CHANGE
    aligned = dataclasses.replace(base, contraction=tuple(contraction), transport=tuple(transport))
    other_probes = trace_checkpoint(tiny_model_path("llama"), probes=load_probes().prompts[:12], device="cpu")

    paths = {}
    for name, trace in [("base", base), ("aligned", aligned), ("other_probes", other_probes)]:
        paths[name] = str(trace.save(folder / f"{name}.json"))
    return paths


def make_trace(contraction, transport) -> DepthTrace:
    return DepthTrace(
        contraction=tuple(contraction),
        transport=tuple(transport),
        transport_per_prompt=(),
        settings=TraceSettings(),
        probes={"fingerprint": "sha256:0"},
        checkpoint={"name": "synthetic", "dtype": "float32"},
        environment={},
    )


def test_compare_prints_layer_table(trace_files, capsys):
    status = main(["compare", trace_files["base"], trace_files["aligned"]])

    stdout = capsys.readouterr().out
    assert status == 0
    rows = table_rows(stdout)
    assert [row[0] for row in rows] == ["0", "1", "2", "3", "4"]
    assert rows[4][3] == f"{-LATE_CHANGE:+.4f}"
    assert rows[4][6] == f"{LATE_CHANGE:+.4f}"
    assert rows[1][3] == "+0.0000"
    assert len(rows[0]) == 4


def test_compare_marks_late_band(trace_files, capsys):
    main(["compare", trace_files["base"], trace_files["aligned"], "--labels", "base", "aligned"])

    stdout = capsys.readouterr().out
    assert "A: base (" in stdout
    assert "B: aligned (" in stdout
    assert "metric       early (1-1)    middle (2-3)    late (4-4)    total |B - A|" in stdout
    assert "contraction  0.0%           0.0%            100.0% *      0.2500" in stdout
    assert "contraction: the largest share of the change is in the late band (100.0%)" in stdout
    assert "transport: the largest share of the change is in the late band (100.0%)" in stdout


def test_compare_writes_png(trace_files, tmp_path, capsys):
    out = tmp_path / "compare.png"

    status = main(["compare", trace_files["base"], trace_files["aligned"], "--out", str(out)])

    assert status == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert png_size(out) == (1000, 750)


def test_compare_rejects_other_probes(trace_files, capsys):
    status = main(["compare", trace_files["base"], trace_files["other_probes"]])

    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert f"{trace_files['other_probes']} is not comparable with {trace_files['base']}" in captured.err
    assert "probe token ids differ" in captured.err
    assert "--force" in captured.err


def test_compare_force_other_probes(trace_files, capsys):
    status = main(["compare", trace_files["base"], trace_files["other_probes"], "--force"])

    captured = capsys.readouterr()
    assert status == 0
    assert "spinal: warning:" in captured.err
    assert "probe token ids differ" in captured.err
    assert len(table_rows(captured.out)) == 5


def test_compare_rejects_other_layer_count_forced(trace_files, tmp_path, capsys):
    deeper = make_trace([1.0] * 7, [0.5] * 6).save(tmp_path / "deeper.json")

    status = main(["compare", trace_files["base"], str(deeper), "--force"])

    captured = capsys.readouterr()
    assert status == 2
    assert "different layer counts (4 and 6)" in captured.err


def test_compare_without_matplotlib_prints(trace_files, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    status = main(["compare", trace_files["base"], trace_files["aligned"]])

    assert status == 0
    assert len(table_rows(capsys.readouterr().out)) == 5


def test_compare_out_without_matplotlib_exit_2(trace_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "compare.png"

    status = main(["compare", trace_files["base"], trace_files["aligned"], "--out", str(out)])

    assert status == 2
    assert PLOT_INSTALL_HINT in capsys.readouterr().err
    assert not out.exists()


def test_plot_default_out_next_to_trace(trace_files, capsys):
    expected = trace_files["base"].removesuffix(".json") + ".png"

    status = main(["plot", trace_files["base"]])

    assert status == 0
    assert f"wrote {expected}" in capsys.readouterr().out
    assert png_size(expected) == (1000, 450)


def test_plot_against_baseline_reports_drift(trace_files, tmp_path, capsys):
    out = tmp_path / "gate.png"

    status = main(["plot", trace_files["aligned"], trace_files["base"], "--out", str(out)])

    stdout = capsys.readouterr().out
    assert status == 0
    assert "is out of tolerance against " in stdout
    assert "contraction fell in layer 4" in stdout
    assert "transport rose in layer 4" in stdout
    assert png_size(out) == (1000, 450)


def test_plot_within_tolerance(trace_files, tmp_path, capsys):
    status = main(["plot", trace_files["base"], trace_files["base"], "--out", str(tmp_path / "same.png")])

    assert status == 0
    assert "within tolerance" in capsys.readouterr().out


def test_plot_wider_tolerance_passes(trace_files, tmp_path, capsys):
    status = main(["plot", trace_files["aligned"], trace_files["base"], "--atol", "0.3", "--out", str(tmp_path / "wide.png")])

    assert status == 0
    assert "within tolerance" in capsys.readouterr().out


def test_plot_rejects_other_probes(trace_files, tmp_path, capsys):
    status = main(["plot", trace_files["other_probes"], trace_files["base"], "--out", str(tmp_path / "x.png")])

    assert status == 2
    assert "probe token ids differ" in capsys.readouterr().err


def test_plot_without_matplotlib_exit_2(trace_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "trace.png"

    status = main(["plot", trace_files["base"], "--out", str(out)])

    assert status == 2
    assert PLOT_INSTALL_HINT in capsys.readouterr().err
    assert not out.exists()


def test_plot_zero_tolerance_exit_2(trace_files, tmp_path, capsys):
    status = main(["plot", trace_files["aligned"], trace_files["base"], "--atol", "0", "--rtol", "0", "--z", "0", "--out", str(tmp_path / "x.png")])

    assert status == 2
    assert "allows no change" in capsys.readouterr().err


def test_plot_missing_trace_exit_2(tmp_path, capsys):
    status = main(["plot", str(tmp_path / "absent.json")])

    assert status == 2
    assert "not found" in capsys.readouterr().err


def test_band_shares_split_by_third():
    # 6 layers: early 1-2, middle 3-4, late 5-6. Layer 0's contraction change is in no band.
    first = make_trace([1.0] * 7, [0.5] * 6)
    second = make_trace([9.0, 1.1, 1.0, 1.0, 1.2, 1.0, 1.7], [0.5, 0.5, 0.5, 0.5, 0.4, 0.6])

    shares = band_shares(first, second)

    assert shares["contraction"].total == pytest.approx(1.0)
    assert shares["contraction"].shares == pytest.approx({"early": 0.1, "middle": 0.2, "late": 0.7})
    assert shares["contraction"].largest_bands == ("late",)
    assert shares["transport"].shares == pytest.approx({"early": 0.0, "middle": 0.0, "late": 1.0})
    assert shares["contraction"].band_layers == {"early": [1, 2], "middle": [3, 4], "late": [5, 6]}


def test_band_shares_tie_marks_both():
    first = make_trace([1.0] * 7, [0.5] * 6)
    second = make_trace([1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.5], [0.5] * 6)

    shares = band_shares(first, second)

    assert shares["contraction"].largest_bands == ("early", "late")


def test_band_shares_no_change():
    trace = make_trace([1.0] * 7, [0.5] * 6)

    shares = band_shares(trace, trace)

    assert shares["transport"].total == 0
    assert shares["transport"].shares == {"early": None, "middle": None, "late": None}
    assert shares["transport"].largest_bands == ()
