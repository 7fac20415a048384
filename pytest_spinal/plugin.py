"""pytest entry point of pytest-spinal: options, ini settings, fixtures and the summary.

This module imports no torch, transformers or scipy; they load when a fixture first traces.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator

import pytest

if TYPE_CHECKING:
    from pytest_spinal.session import GateBaseline, SpinalSession, TraceFactory

_SESSION_KEY = pytest.StashKey["SpinalSession"]()

_TOLERANCE_HELP = {
    "atol": "default absolute tolerance of {metric} in gates",
    "rtol": "default tolerance of {metric} in gates, relative to |baseline|",
    "z": "default multiple of the baseline's spread that {metric} may move in gates (0 turns auto off)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("spinal", "depth-trace regression gates (pytest-spinal)")
    group.addoption(
        "--spinal-update",
        action="store_true",
        dest="spinal_update",
        help="record or re-record the baselines of the selected tests instead of comparing with them",
    )
    group.addoption(
        "--spinal-baseline-dir",
        dest="spinal_baseline_dir",
        default=None,
        metavar="DIR",
        help="folder of baseline JSON files (default: the spinal_baseline_dir ini setting)",
    )
    group.addoption(
        "--spinal-device",
        dest="spinal_device",
        default=None,
        metavar="DEVICE",
        help="torch device for tracing: auto, cpu, cuda or cuda:N (default: the spinal_device ini setting)",
    )
    group.addoption(
        "--spinal-device-map",
        dest="spinal_device_map",
        default=None,
        choices=("auto", "balanced", "balanced_low_0", "sequential", "none"),
        help="spread models over several GPUs through accelerate, for models larger than one GPU "
        "(default: the spinal_device_map ini setting; 'none' turns it off)",
    )
    group.addoption(
        "--spinal-dtype",
        dest="spinal_dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="dtype models run in while tracing (default: the spinal_dtype ini setting)",
    )
    group.addoption(
        "--spinal-probes",
        dest="spinal_probes",
        default=None,
        metavar="FILE",
        help="default probe set: .jsonl or text file, or 'default' for the packaged set",
    )
    group.addoption(
        "--spinal-prune",
        action="store_true",
        dest="spinal_prune",
        help="delete baseline files that no test used; acts only after a full, passing run of the suite",
    )
    group.addoption(
        "--spinal-report",
        dest="spinal_report",
        default=None,
        metavar="DIR",
        help="write DIR/index.html with every gate's summary and a PNG per gate comparison (PNGs need matplotlib)",
    )

    parser.addini("spinal_baseline_dir", "folder of baseline JSON files, relative to the rootdir", default="baselines")
    parser.addini("spinal_device", "torch device for tracing: auto, cpu, cuda or cuda:N", default="auto")
    parser.addini("spinal_device_map", "device_map for loading checkpoints: none, auto, balanced, balanced_low_0 or sequential", default="none")
    parser.addini("spinal_dtype", "dtype models run in while tracing: float32, bfloat16 or float16", default="float32")
    parser.addini("spinal_probes", "default probe set: a file relative to the rootdir, or 'default'", default="default")
    from pytest_spinal.compare import BUILTIN_TOLERANCES

    for metric, tolerance in BUILTIN_TOLERANCES.items():
        for kind, help_text in _TOLERANCE_HELP.items():
            parser.addini(f"spinal_{metric}_{kind}", help_text.format(metric=metric), default=f"{getattr(tolerance, kind):g}")


def pytest_configure(config: pytest.Config) -> None:
    from pytest_spinal import compare
    from pytest_spinal.baselines import BaselineStore, ci_is_set
    from pytest_spinal.session import SpinalSession
    from pytest_spinal.tolerance import Tolerance

    if config.option.spinal_update and ci_is_set():
        raise pytest.UsageError(
            "--spinal-update writes baselines, which is not allowed while the CI environment variable is set; "
            "record baselines on a development machine and commit them"
        )

    rootpath = config.rootpath
    baseline_dir = config.option.spinal_baseline_dir
    root = Path(baseline_dir) if baseline_dir else rootpath / config.getini("spinal_baseline_dir")
    probes = config.option.spinal_probes or config.getini("spinal_probes")
    if probes != "default" and not Path(probes).is_absolute() and (rootpath / probes).exists():
        probes = str(rootpath / probes)

    session = SpinalSession(
        store=BaselineStore(root=root.resolve()),
        update=config.option.spinal_update,
        device=config.option.spinal_device or config.getini("spinal_device"),
        device_map=_device_map(config.option.spinal_device_map or config.getini("spinal_device_map")),
        dtype=config.option.spinal_dtype or config.getini("spinal_dtype"),
        probes=probes,
        rootpath=rootpath,
        report_dir=_report_dir(config.option.spinal_report),
    )
    config.stash[_SESSION_KEY] = session

    tolerances = {}
    for metric in ("contraction", "transport"):
        values = {kind: _ini_float(config, f"spinal_{metric}_{kind}") for kind in ("atol", "rtol", "z")}
        try:
            tolerances[metric] = Tolerance(**values)
        except ValueError as error:
            raise pytest.UsageError(f"the spinal_{metric}_* ini settings are invalid: {error}") from None
    session.previous_tolerances = dict(compare.DEFAULT_TOLERANCES)
    compare.DEFAULT_TOLERANCES.update(tolerances)
    compare.comparison_listeners.append(session.on_comparison)
    config.pluginmanager.register(_SessionHooks(session), "spinal-session")


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_SESSION_KEY, None)
    if session is None:
        return
    from pytest_spinal import compare

    # pytester runs nested sessions in one process: leave the outer session's state as it was.
    if session.on_comparison in compare.comparison_listeners:
        compare.comparison_listeners.remove(session.on_comparison)
    compare.DEFAULT_TOLERANCES.update(session.previous_tolerances)


class _SessionHooks:
    """Hooks that need the session state; registered by ``pytest_configure``."""

    def __init__(self, session: SpinalSession) -> None:
        self.session = session

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, Any, Any]:
        self.session.current_item = item
        try:
            return (yield)
        finally:
            self.session.current_item = None

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.session.deselected += len(items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.session.collect(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Runs before the terminal summary, and under pytest-xdist after every worker's reports arrived.
        if self.session.report_dir is None or hasattr(session.config, "workerinput"):
            return
        from pytest_spinal.html_report import write_index

        try:
            index = write_index(self.session.report_dir, self.session.gates)
        except OSError as error:
            self.session.report_line = f"report: writing {self.session.report_dir / 'index.html'} failed: {error}"
        else:
            self.session.report_line = f"report: {index}"

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if hasattr(config, "workerinput"):
            return
        from pytest_spinal.summary import write_summary

        write_summary(terminalreporter, config, self.session)


@pytest.fixture(scope="session")
def spinal_trace(pytestconfig: pytest.Config) -> TraceFactory:
    """Trace a checkpoint once per session: ``spinal_trace(checkpoint, probes=..., settings=...)``."""
    from pytest_spinal.session import TraceFactory

    return TraceFactory(pytestconfig.stash[_SESSION_KEY])


@pytest.fixture
def spinal_baseline(request: pytest.FixtureRequest) -> GateBaseline:
    """This test's baseline: ``spinal_baseline.assert_close(trace, transport=Tolerance(...))``."""
    from pytest_spinal.session import BASELINE_PROPERTY, GateBaseline

    session = request.config.stash[_SESSION_KEY]
    gate = GateBaseline(session, request.node.nodeid)
    session.record(BASELINE_PROPERTY, {"path": str(gate.path.resolve()), "action": "referenced"})
    return gate


def _report_dir(option: str | None) -> Path | None:
    if not option:
        return None
    directory = Path(option).resolve()
    if directory.exists() and not directory.is_dir():
        raise pytest.UsageError(f"--spinal-report {option} is a file, but the report needs a folder: give another path")
    return directory


def _device_map(value: str) -> str | None:
    from pytest_spinal.checkpoints import DEVICE_MAPS

    if value == "none":
        return None
    if value not in DEVICE_MAPS:
        raise pytest.UsageError(f"spinal_device_map = {value!r} is invalid; use none or one of {', '.join(DEVICE_MAPS)}")
    return value


def _ini_float(config: pytest.Config, name: str) -> float:
    text = config.getini(name)
    try:
        value = float(text)
    except ValueError:
        raise pytest.UsageError(f"ini setting {name} = {text!r} is not a number; write e.g. {name} = 0.02") from None
    if not value >= 0:
        raise pytest.UsageError(f"ini setting {name} = {text!r} must be >= 0")
    return value
