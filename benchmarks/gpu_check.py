"""Check the CUDA path on SmolLM2-135M-Instruct: trace differences against the CPU, and GPU timings.

Traces the packaged checkpoint over the default probes on the CPU in float32 (the reference),
then on the first CUDA device in float32 and in bfloat16. For each GPU trace it reports the
median time over repeated runs, the largest difference of contraction and transport from the CPU
trace, and the gate's verdict under the default tolerances against a CPU baseline with its spread.
It also traces in float32 with TF32 switched on globally, to show that tracing turns it off.

Needs a CUDA GPU; it exits with status 2 without one. On one H200 it should take a few minutes,
most of them the CPU reference.

    python benchmarks/gpu_check.py --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from trace_speed import machine


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed GPU traces per setting; the median is reported")
    parser.add_argument("--markdown", default=None, help="append the results to this Markdown file")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; run this on a machine with a GPU", file=sys.stderr)
        return 2

    rows = run_checks(arguments.repeats)
    text = render(rows, arguments)
    print(text)
    if arguments.markdown:
        with open(arguments.markdown, "a", encoding="utf-8") as stream:
            stream.write(text)
    return 0


def run_checks(repeats: int) -> list[dict[str, Any]]:
    """Trace on the CPU once and on CUDA per setting; return one row per GPU setting."""
    import torch

    from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT, load_checkpoint
    from pytest_spinal.compare import compare_traces
    from pytest_spinal.probes import encode_probes, load_probes
    from pytest_spinal.trace import TraceSettings
    from pytest_spinal.tracing import trace_loaded

    cpu = load_checkpoint(DEFAULT_CHECKPOINT, device="cpu", dtype="float32")
    encoded = encode_probes(cpu.tokenizer, load_probes())
    started = time.perf_counter()
    reference = trace_loaded(cpu, encoded, settings=TraceSettings(), spread=True)
    cpu_seconds = time.perf_counter() - started

    settings = [
        ("cuda float32", "float32", False),
        ("cuda float32, TF32 on before tracing", "float32", True),
        ("cuda bfloat16", "bfloat16", False),
    ]
    rows = [{"setting": f"cpu float32 (reference, {torch.get_num_threads()} threads, with spread)", "seconds": cpu_seconds}]
    for label, dtype, tf32 in settings:
        torch.cuda.reset_peak_memory_stats()
        loaded = load_checkpoint(DEFAULT_CHECKPOINT, device="cuda", dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            trace_loaded(loaded, encoded, settings=TraceSettings(), spread=False)  # warm-up: kernels, allocator
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                started = time.perf_counter()
                trace = trace_loaded(loaded, encoded, settings=TraceSettings(), spread=False)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        comparison = compare_traces(trace, reference, baseline_name="the CPU trace")
        rows.append(
            {
                "setting": label,
                "seconds": statistics.median(times),
                "contraction": max(abs(a - b) for a, b in zip(trace.contraction, reference.contraction)),
                "transport": max(abs(a - b) for a, b in zip(trace.transport, reference.transport)),
                "worst": comparison.worst.excess if comparison.worst else 0.0,
                "verdict": "pass" if comparison.passed else "FAIL",
                "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            }
        )
        del loaded
        torch.cuda.empty_cache()
    return rows


def render(rows: list[dict[str, Any]], arguments: argparse.Namespace) -> str:
    import torch

    lines = [
        "",
        f"## CUDA path on SmolLM2-135M-Instruct, {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `{' '.join(['python benchmarks/gpu_check.py', *sys.argv[1:]])}`",
        f"Machine: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}; CPU {machine()}.",
        f"Default probes; GPU times are medians of {arguments.repeats} traces after one warm-up, without the spread. "
        "Differences are the largest over the layers against the CPU float32 trace; the verdict uses the default "
        "tolerances against that trace and its spread.",
        "",
        "| setting | seconds | max abs delta: contraction | transport | worst abs delta / allowed | verdict | peak GPU MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "verdict" not in row:
            lines.append(f"| {row['setting']} | {row['seconds']:.2f} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {row['setting']} | {row['seconds']:.2f} | {row['contraction']:.2e} | {row['transport']:.2e} "
            f"| {row['worst']:.2f} | {row['verdict']} | {row['peak_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
