"""Command-line options and ini settings of the plugin."""

from __future__ import annotations

import pytest

from pytest_spinal import Tolerance
from pytest_spinal import compare

OPTIONS = [
    "--spinal-update",
    "--spinal-baseline-dir=DIR",
    "--spinal-device=DEVICE",
    "--spinal-device-map={auto,balanced,balanced_low_0,sequential,none}",
    "--spinal-dtype={float32,bfloat16,float16}",
    "--spinal-probes=FILE",
    "--spinal-prune",
]

INI_SETTINGS = [
    "spinal_baseline_dir",
    "spinal_device",
    "spinal_device_map",
    "spinal_dtype",
    "spinal_probes",
    "spinal_contraction_atol",
    "spinal_contraction_rtol",
    "spinal_contraction_z",
    "spinal_transport_atol",
    "spinal_transport_rtol",
    "spinal_transport_z",
]

GATE_MODULE = """
def test_gate(spinal_trace, spinal_baseline):
    spinal_baseline.assert_close(spinal_trace("model"))
"""


def test_help_shows_spinal_group(pytester):
    result = pytester.runpytest("--help")

    result.stdout.fnmatch_lines(["depth-trace regression gates (pytest-spinal):"])


@pytest.mark.parametrize("option", OPTIONS)
def test_help_describes_option(pytester, option):
    result = pytester.runpytest("--help")

    lines = result.stdout.lines
    index = next(index for index, line in enumerate(lines) if line.strip().startswith(option))
    described = " ".join(lines[index : index + 2]).replace(option, "", 1)
    assert described.strip(), f"no help text after {option}"


@pytest.mark.parametrize("name", INI_SETTINGS)
def test_help_lists_ini_setting(pytester, name):
    result = pytester.runpytest("--help")

    result.stdout.fnmatch_lines([f"  {name} (string):*"])


# These tests write --spinal-baseline-dir=DIR, not "--spinal-baseline-dir DIR". pytest 9 finds the
# rootdir and ini file before plugins add their options. So it takes a separate, existing DIR for a
# test path, and when DIR lies outside the project it does not read the project's ini file.


def test_baseline_dir_option_writes_there(project, tmp_path):
    project.makepyfile(test_gate=GATE_MODULE)
    folder = tmp_path / "gates"

    project.runpytest("--spinal-update", f"--spinal-baseline-dir={folder}").assert_outcomes(passed=1)

    assert (folder / "test_gate" / "test_gate.json").is_file()
    assert not (project.path / "baselines").exists()


def test_baseline_dir_option_is_read(project, tmp_path):
    project.makepyfile(test_gate=GATE_MODULE)
    folder = tmp_path / "gates"
    project.runpytest("--spinal-update", f"--spinal-baseline-dir={folder}").assert_outcomes(passed=1)

    project.runpytest(f"--spinal-baseline-dir={folder}").assert_outcomes(passed=1)


def test_baseline_dir_ini_writes_there(project):
    project.makeini("[pytest]\nspinal_device = cpu\nspinal_probes = probes.txt\nspinal_baseline_dir = golden\n")
    project.makepyfile(test_gate=GATE_MODULE)

    project.runpytest("--spinal-update").assert_outcomes(passed=1)

    assert (project.path / "golden" / "test_gate" / "test_gate.json").is_file()
    assert not (project.path / "baselines").exists()


def test_transport_atol_ini_admits_drift(project, drifted_llama, replace_model):
    project.makepyfile(test_gate=GATE_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=1)
    replace_model(drifted_llama)
    project.runpytest().assert_outcomes(failed=1)

    project.makeini("[pytest]\nspinal_device = cpu\nspinal_probes = probes.txt\nspinal_transport_atol = 1.0\n")
    result = project.runpytest()

    result.assert_outcomes(passed=1)


def test_ini_tolerance_restored_after_session(project):
    before = dict(compare.DEFAULT_TOLERANCES)
    project.makeini("[pytest]\nspinal_transport_atol = 1.0\nspinal_contraction_rtol = 0.5\n")
    project.makepyfile(test_nothing="def test_nothing():\n    pass\n")

    project.runpytest().assert_outcomes(passed=1)

    assert compare.DEFAULT_TOLERANCES == before


def test_ini_tolerance_reaches_gate(project):
    project.makeini("[pytest]\nspinal_transport_atol = 1.0\nspinal_transport_rtol = 0.5\nspinal_transport_z = 3\n")
    project.makepyfile(
        test_tolerance="""
from pytest_spinal import Tolerance
from pytest_spinal.compare import DEFAULT_TOLERANCES


def test_default_tolerance():
    assert DEFAULT_TOLERANCES["transport"] == Tolerance(atol=1.0, rtol=0.5, z=3)
"""
    )

    project.runpytest().assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("spinal_contraction_atol = abc", "ini setting spinal_contraction_atol = 'abc' is not a number*"),
        ("spinal_transport_rtol = -0.1", "ini setting spinal_transport_rtol = '-0.1' must be >= 0"),
        ("spinal_transport_atol = nan", "ini setting spinal_transport_atol = 'nan' must be >= 0"),
    ],
    ids=["not-a-number", "negative", "nan"],
)
def test_invalid_ini_tolerance_is_usage_error(project, setting, message):
    project.makeini(f"[pytest]\n{setting}\n")
    project.makepyfile(test_nothing="def test_nothing():\n    pass\n")

    result = project.runpytest()

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_invalid_dtype_option_is_usage_error(project):
    result = project.runpytest("--spinal-dtype", "int8")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--spinal-dtype: invalid choice: 'int8'*"])


def test_default_tolerance_unchanged_by_plugin():
    # The ini defaults equal the library defaults, so a suite without ini settings gates alike.
    assert compare.DEFAULT_TOLERANCES == dict(compare.BUILTIN_TOLERANCES)
    assert compare.DEFAULT_TOLERANCES["contraction"] == Tolerance(atol=0.015, z=2.5)
    assert compare.DEFAULT_TOLERANCES["transport"] == Tolerance(atol=0.015, z=2.5)


def test_device_map_option_traces_alike(project):
    # On a machine with one device the mapped model traces like the plain one.
    project.makepyfile(test_gate=GATE_MODULE)
    project.runpytest("--spinal-update").assert_outcomes(passed=1)

    result = project.runpytest("--spinal-device-map=auto", "-o", "spinal_contraction_z=0", "-o", "spinal_transport_z=0")

    result.assert_outcomes(passed=1)


def test_invalid_device_map_ini_is_usage_error(project):
    project.makepyfile(test_gate=GATE_MODULE)

    result = project.runpytest("-o", "spinal_device_map=everywhere")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*spinal_device_map = 'everywhere' is invalid; use none or one of auto, balanced*"])
