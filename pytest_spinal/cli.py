"""The ``spinal`` command: trace a checkpoint and print or save its depth trace."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Sequence

from pytest_spinal import __version__
from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT
from pytest_spinal.errors import SpinalError

if TYPE_CHECKING:
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
        rows.append((layer, value, transport))
    table = tabulate(
        rows,
        headers=("layer", "contraction", "transport to next"),
        floatfmt=".4f",
        missingval="",
    )

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
    trace.set_defaults(handler=_run_trace)
    return parser


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
    )

    print(f"depth trace of {trace.checkpoint['name']} ({trace.checkpoint['model_class']}, {trace.checkpoint['dtype']}, "
          f"{trace.environment['device']}): {trace.probes['prompts']} prompts, {trace.probes['positions_traced']} positions")
    print(format_table(trace))
    if arguments.out:
        path = trace.save(arguments.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
