"""Tests of the ``spinal`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pytest_spinal
from pytest_spinal.cli import format_table, main
from pytest_spinal.trace import DepthTrace, TraceSettings

from cli_tables import table_rows
from tiny_models import tiny_model_path

NUM_LAYERS = 4


def test_trace_prints_table_and_writes(tmp_path, capsys):
    out = tmp_path / "trace.json"

    status = main(["trace", str(tiny_model_path("gpt2")), "--out", str(out), "--device", "cpu"])

    stdout = capsys.readouterr().out
    assert status == 0
    assert "layer" in stdout
    assert "contraction" in stdout
    assert "transport to next" in stdout
    assert [row[0] for row in table_rows(stdout)] == [str(layer) for layer in range(NUM_LAYERS + 1)]
    assert f"wrote {out}" in stdout
    assert DepthTrace.load(out).num_layers == NUM_LAYERS


def test_trace_table_matches_file(tmp_path, capsys):
    out = tmp_path / "trace.json"

    main(["trace", str(tiny_model_path("gpt2")), "--out", str(out), "--device", "cpu"])

    trace = DepthTrace.load(out)
    rows = table_rows(capsys.readouterr().out)
    assert [float(row[1]) for row in rows] == [round(value, 4) for value in trace.contraction]
    assert [float(row[2]) for row in rows] == [round(value, 4) for value in trace.spread.contraction]
    assert [float(row[4]) for row in rows[:-1]] == [round(value, 4) for value in trace.spread.transport]


def test_trace_without_spread(tmp_path, capsys):
    out = tmp_path / "trace.json"

    main(["trace", str(tiny_model_path("gpt2")), "--out", str(out), "--device", "cpu", "--no-spread"])

    assert DepthTrace.load(out).spread is None
    assert len(table_rows(capsys.readouterr().out)[1]) == 3


def test_trace_options_recorded(tmp_path, capsys):
    probes = tmp_path / "probes.txt"
    probes.write_text("\n".join(pytest_spinal.load_probes().prompts[:5]) + "\n", encoding="utf-8")
    out = tmp_path / "trace.json"

    status = main(
        [
            "trace",
            str(tiny_model_path("llama")),
            "--device", "cpu",
            "--probes", str(probes),
            "--tail-window", "0.25", "0.75",
            "--metric-dtype", "float64",
            "--batch-size", "2",
            "--no-chat-template",
            "--out", str(out),
        ]
    )

    trace = DepthTrace.load(out)
    assert status == 0
    assert "5 prompts" in capsys.readouterr().out
    assert trace.settings == TraceSettings(tail_window=(0.25, 0.75), metric_dtype="float64")
    assert trace.probes["source"] == str(probes)
    assert trace.probes["chat_template"] is False
    assert trace.run["batch_size"] == 2


def test_missing_checkpoint_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-model"

    status = main(["trace", str(missing), "--device", "cpu"])

    stderr = capsys.readouterr().err
    assert status == 2
    assert "not found" in stderr
    assert str(missing) in stderr


def test_missing_probe_file_exit_2(tmp_path, capsys):
    status = main(["trace", str(tiny_model_path("gpt2")), "--device", "cpu", "--probes", str(tmp_path / "absent.txt")])

    assert status == 2
    assert "not found" in capsys.readouterr().err


def test_invalid_tail_window_exit_2(capsys):
    status = main(["trace", str(tiny_model_path("gpt2")), "--device", "cpu", "--tail-window", "0.9", "0.5"])

    stderr = capsys.readouterr().err
    assert status == 2
    assert "tail_window (0.9, 0.5) is invalid" in stderr
    assert "0 <= low < high <= 1" in stderr


def test_cuda_without_gpu_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")

    status = main(["trace", str(tiny_model_path("gpt2")), "--device", "cuda"])

    assert status == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_invalid_dtype_usage_error(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["trace", str(tiny_model_path("gpt2")), "--dtype", "float8"])

    assert raised.value.code == 2
    assert "float8" in capsys.readouterr().err


def test_module_version():
    result = subprocess.run(
        [sys.executable, "-m", "pytest_spinal.cli", "--version"], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0
    assert result.stdout.strip() == f"spinal {pytest_spinal.__version__}"


def test_console_script_version():
    script = Path(sys.executable).with_name("spinal")
    if not script.exists():
        pytest.skip(f"no spinal console script next to {sys.executable}; install the package to get it")

    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)

    assert result.returncode == 0
    assert result.stdout.strip() == f"spinal {pytest_spinal.__version__}"


def test_format_table_summary():
    trace = DepthTrace(
        contraction=(1.0, 2.0, 3.0, 4.0, 5.0),
        transport=(0.5, 0.25, 0.125, 1.0),
        transport_per_prompt=(),
        settings=TraceSettings(),
        probes={},
        checkpoint={},
        environment={},
    )

    text = format_table(trace)

    assert "path length (sum of transport): 1.8750 rad" in text
    assert "early band (layers 1-1): mean contraction 2.0000, mean transport 0.5000" in text
    assert "middle band (layers 2-3): mean contraction 3.5000, mean transport 0.1875" in text
    assert "late band (layers 4-4): mean contraction 5.0000, mean transport 1.0000" in text
