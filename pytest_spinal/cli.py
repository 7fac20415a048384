"""The ``spinal`` command: trace a checkpoint, and print, save, plot or compare depth traces."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pytest_spinal import __version__
from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT
from pytest_spinal.errors import SpinalError

if TYPE_CHECKING:
    from pytest_spinal.plots import TracePlot
    from pytest_spinal.trace import DepthTrace

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spinal`` command line; return the process exit status."""
    parser = _build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        return arguments.handler(arguments)
    except SpinalError as error:
        print(f"spinal: error: {error}", file=sys.stderr)
        return 2


def format_table(trace: DepthTrace) -> str:
    """Render a trace as a per-layer table followed by its derived figures."""
    from tabulate import tabulate

    rows = []
    for layer, value in enumerate(trace.contraction):
        transport = trace.transport[layer] if layer < trace.num_layers else None
        row: tuple = (layer, value, transport)
        if trace.spread is not None:
            transport_spread = trace.spread.transport[layer] if layer < trace.num_layers else None
            row = (layer, value, trace.spread.contraction[layer], transport, transport_spread)
        rows.append(row)
    headers: tuple = ("layer", "contraction", "transport to next")
    if trace.spread is not None:
        headers = ("layer", "contraction", "spread", "transport to next", "spread")
    table = tabulate(rows, headers=headers, floatfmt=".4f", missingval="")

    bands = trace.band_means()
    summary = [f"path length (sum of transport): {trace.path_length:.4f} rad"]
    for band, means in bands.items():
        if means["contraction"] is None:
            continue
        layers = trace.band_layers(band)
        summary.append(
            f"{band} band (layers {layers[0]}-{layers[-1]}): mean contraction "
            f"{means['contraction']:.4f}, mean transport {means['transport']:.4f}"
        )
    return table + "\n\n" + "\n".join(summary)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinal", description="Trace causal language models into SPINAL depth traces.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    trace = commands.add_parser("trace", help="trace a checkpoint and print its per-layer table")
    trace.add_argument(
        "checkpoint",
        nargs="?",
        default=DEFAULT_CHECKPOINT,
        help=f"local Hugging Face folder, .gguf file, or pkg:PACKAGE (default: {DEFAULT_CHECKPOINT}, SmolLM2-135M-Instruct)",
    )
    trace.add_argument("--probes", default=None, help="probe set: a .jsonl file or a text file with one prompt a line (default: the packaged set)")
    trace.add_argument("--out", default=None, help="write the depth trace as JSON to this file")
    trace.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1 (default: auto)")
    trace.add_argument(
        "--device-map",
        default=None,
        choices=("auto", "balanced", "balanced_low_0", "sequential"),
        help="spread the model over several GPUs through accelerate, for a model larger than one GPU (default: off)",
    )
    trace.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype the model runs in (default: float32)")
    trace.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default: 8)")
    trace.add_argument("--chunk-size", type=int, default=256, help="token positions per logit-lens product (default: 256)")
    trace.add_argument(
        "--tail-window",
        type=float,
        nargs=2,
        default=(0.5, 0.9),
        metavar=("LOW", "HIGH"),
        help="fractions of the numerical rank that bound the contraction fit (default: 0.5 0.9)",
    )
    trace.add_argument("--positions", default="all", choices=("all", "last"), help="token positions traced: every real token, or each prompt's last (default: all)")
    trace.add_argument("--metric-dtype", default="float32", choices=("float32", "float64"), help="dtype of the logit-lens softmax and distances (default: float32)")
    trace.add_argument("--no-chat-template", action="store_true", help="tokenise prompts as plain text even when the tokenizer has a chat template")
    trace.add_argument(
        "--no-spread",
        action="store_true",
        help="skip the spread over prompt resamples (saves time; a trace without it cannot anchor auto tolerances)",
    )
    trace.set_defaults(handler=_run_trace)
    _add_plot_commands(commands)
    return parser


def _add_plot_commands(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser("plot", help="draw a trace, or a trace against a baseline, as a PNG (needs matplotlib)")
    plot.add_argument("trace", help="depth trace JSON file, as written by spinal trace --out")
    plot.add_argument("baseline", nargs="?", default=None, help="baseline trace JSON file to draw the trace against")
    plot.add_argument("--out", default=None, help="PNG file to write (default: the trace's path with .png in place of its suffix)")
    plot.add_argument("--atol", type=float, default=0.015, help="absolute tolerance of both metrics against the baseline (default: 0.015)")
    plot.add_argument("--rtol", type=float, default=0.0, help="tolerance of both metrics relative to |baseline| (default: 0)")
    plot.add_argument("--z", type=float, default=2.5, help="multiple of the baseline's spread that both metrics may move, where it exceeds atol + rtol (default: 2.5)")
    plot.set_defaults(handler=_run_plot)

    compare = commands.add_parser(
        "compare", help="print the per-layer difference of two traces and which third of the depth contains most of it"
    )
    compare.add_argument("first", metavar="A", help="first depth trace JSON file, e.g. the base checkpoint")
    compare.add_argument("second", metavar="B", help="second depth trace JSON file, e.g. the aligned checkpoint; differences are B - A")
    compare.add_argument("--out", default=None, help="also draw both traces and their difference into this PNG file (needs matplotlib)")
    compare.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"), help="names of the traces in the output (default: the file paths)")
    compare.add_argument(
        "--force",
        action="store_true",
        help="compare traces made with other probes, settings or model dtype; their differences then mix model and input changes",
    )
    compare.set_defaults(handler=_run_compare)


def _run_trace(arguments: argparse.Namespace) -> int:
    from pytest_spinal.trace import TraceSettings
    from pytest_spinal.tracing import trace_checkpoint

    try:
        settings = TraceSettings(
            tail_window=tuple(arguments.tail_window),
            positions=arguments.positions,
            metric_dtype=arguments.metric_dtype,
        )
    except ValueError as error:
        print(f"spinal: error: {error}", file=sys.stderr)
        return 2

    trace = trace_checkpoint(
        arguments.checkpoint,
        probes=arguments.probes,
        settings=settings,
        device=arguments.device,
        dtype=arguments.dtype,
        batch_size=arguments.batch_size,
        chunk_size=arguments.chunk_size,
        chat_template=not arguments.no_chat_template,
        spread=not arguments.no_spread,
        device_map=arguments.device_map,
    )

    print(f"depth trace of {trace.checkpoint['name']} ({trace.checkpoint['model_class']}, {trace.checkpoint['dtype']}, "
          f"{trace.environment['device']}): {trace.probes['prompts']} prompts, {trace.probes['positions_traced']} positions")
    print(format_table(trace))
    if arguments.out:
        path = trace.save(arguments.out)
        print(f"wrote {path}")
    return 0


def _run_plot(arguments: argparse.Namespace) -> int:
    from pytest_spinal.compare import compare_traces
    from pytest_spinal.plots import draw_comparison, draw_trace, require_matplotlib
    from pytest_spinal.report import headline
    from pytest_spinal.tolerance import Tolerance
    from pytest_spinal.trace import DepthTrace

    require_matplotlib()
    try:
        tolerance = Tolerance(atol=arguments.atol, rtol=arguments.rtol, z=arguments.z)
    except ValueError as error:
        print(f"spinal: error: {error}", file=sys.stderr)
        return 2

    trace = DepthTrace.load(arguments.trace)
    if arguments.baseline is None:
        plot = draw_trace(trace)
    else:
        baseline = DepthTrace.load(arguments.baseline)
        comparison = compare_traces(
            trace, baseline, contraction=tolerance, transport=tolerance, baseline_name=arguments.baseline
        )
        plot = draw_comparison(comparison)
        if comparison.passed:
            print(f"{arguments.trace} is within tolerance of {arguments.baseline} in every layer ({tolerance.describe()})")
        else:
            print(headline(comparison))

    out = Path(arguments.out) if arguments.out else Path(arguments.trace).with_suffix(".png")
    return _save_plot(plot, out)


def _run_compare(arguments: argparse.Namespace) -> int:
    from pytest_spinal.compare import check_comparable
    from pytest_spinal.difference import format_difference
    from pytest_spinal.plots import draw_pair, require_matplotlib
    from pytest_spinal.trace import DepthTrace

    if arguments.out:
        require_matplotlib()
    first = DepthTrace.load(arguments.first)
    second = DepthTrace.load(arguments.second)

    differences = check_comparable(second, first)
    if differences:
        listing = "\n".join(f"  - {difference}" for difference in differences)
        heading = f"{arguments.second} is not comparable with {arguments.first} (below, A is the baseline and B the trace):"
        if not arguments.force:
            print(
                f"spinal: error: {heading}\n{listing}\n"
                "Trace both checkpoints with the same probes and settings, or pass --force to compare them anyway.",
                file=sys.stderr,
            )
            return 2
        print(f"spinal: warning: {heading}\n{listing}\nCompared anyway because of --force.", file=sys.stderr)

    labels = tuple(arguments.labels) if arguments.labels else (arguments.first, arguments.second)
    print(format_difference(first, second, labels))
    if not arguments.out:
        return 0
    return _save_plot(draw_pair(first, second, labels=labels), Path(arguments.out))


def _save_plot(plot: TracePlot, out: Path) -> int:
    try:
        path = plot.save(out)
    except OSError as error:
        print(f"spinal: error: writing {out} failed: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
