"""Where each gate's baseline file lives: one file per test, named after the test."""

from __future__ import annotations

GATE_MODULE = """
from pytest_spinal import DepthTrace, TraceSettings


def make_trace(name):
    return DepthTrace(
        contraction=(1.0, 0.9),
        transport=(0.5,),
        transport_per_prompt=((0.5,),),
        settings=TraceSettings(),
        probes={"fingerprint": "sha256:" + name},
        checkpoint={"name": name, "dtype": "float32"},
        environment={},
    )


class TestRelease:
    def test_gate(self, spinal_baseline):
        spinal_baseline.assert_close(make_trace(__name__))
"""


def test_class_method_baseline_name(project):
    project.makepyfile(test_names=GATE_MODULE)

    project.runpytest("--spinal-update").assert_outcomes(passed=1)

    assert (project.path / "baselines" / "test_names" / "TestRelease.test_gate.json").is_file()


def test_same_module_name_separate_baselines(project):
    # Two packages each have a test_gate.py with the same test name, as suites split per model do.
    for package in ("llama", "gpt2"):
        project.mkpydir(package)
        (project.path / package / "test_gate.py").write_text(GATE_MODULE, encoding="utf-8")

    project.runpytest("--spinal-update").assert_outcomes(passed=2)

    assert len(list((project.path / "baselines").rglob("*.json"))) == 2
    project.runpytest().assert_outcomes(passed=2)
