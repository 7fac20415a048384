"""Time and memory of tracing SmolLM2-135M-Instruct against its roofline and a materialising peer.

Measures, on the CPU and in float32, over the packaged probe set and over probe sets cut to
about 256, 1024 and 4096 tokens:

- forward: a plain forward pass (decoder, logits of the last position only);
- roofline: a forward pass with hidden states, plus L output-head products over the same tokens,
  plus the L+1 spectra, each timed on its own and summed;
- trace: ``trace_loaded`` without the spread, what a gate run of the plugin runs;
- peer: the logit lens of every layer materialised at once, as logit-lens notebooks do, with the
  same metric definitions.

Each kind runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own.

    python benchmarks/trace_speed.py --repeats 3 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spinal_variants import save_as_safetensors

from pytest_spinal.tracing import DEFAULT_CHUNK_SIZE, _GramSums, _return_freed_heap

KINDS = ("load", "forward", "roofline_forward", "roofline_head", "roofline_spectra", "trace", "peer")
DEFAULT_SWEEP = (256, 1024, 4096)

#: Tokens of the untimed run before each measurement.
WARM_UP_TOKENS = 256

#: The peer is skipped when its materialised logits would exceed this many bytes (its softmax
#: doubles that), rather than
#: letting the kernel's out-of-memory killer end it on a 24 GiB machine.
PEER_LIMIT_BYTES = 8 * 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    parser.add_argument("--sweep", type=int, nargs="*", default=list(DEFAULT_SWEEP), help="probe token counts to sweep")
    parser.add_argument("--markdown", default=None, help="append the results to this Markdown file")
    parser.add_argument("--kinds", nargs="*", choices=KINDS, default=list(KINDS), help="measurements to run (default: all)")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    arguments = parser.parse_args()

    if arguments.worker:
        print(json.dumps(run_worker(arguments.worker, Path(arguments.model), Path(arguments.tokens), arguments.repeats)))
        return 0
    return run_benchmark(arguments)


def run_benchmark(arguments: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="spinal-bench-") as scratch:
        folder = Path(scratch) / "model"
        probe_sets = prepare(folder, Path(scratch), arguments.sweep)

        results = {}
        for label, token_file in probe_sets.items():
            results[label] = {}
            for kind in arguments.kinds:
                print(f"[{label}] {kind} ...", file=sys.stderr, flush=True)
                results[label][kind] = run_kind(kind, folder, token_file, arguments.repeats)

    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    text = render(results, arguments) if set(arguments.kinds) == set(KINDS) else render_memory(results, arguments)
    print(text)
    if arguments.markdown:
        with open(arguments.markdown, "a", encoding="utf-8") as stream:
            stream.write(text)
    return 0


def prepare(folder: Path, scratch: Path, sweep: list[int]) -> dict[str, Path]:
    """Save the packaged checkpoint as safetensors (fast to reload) and write each probe set's token ids."""
    from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT, load_checkpoint
    from pytest_spinal.probes import encode_probes, load_probes

    loaded = load_checkpoint(DEFAULT_CHECKPOINT, device="cpu")
    save_as_safetensors(loaded, folder)
    encoded = encode_probes(loaded.tokenizer, load_probes())

    probe_sets = {f"default probes ({encoded.num_tokens} tokens)": encoded.token_ids}
    for target in sweep:
        probe_sets[f"{target} tokens"] = cut_to_tokens(encoded.token_ids, target)

    files = {}
    for index, (label, token_ids) in enumerate(probe_sets.items()):
        path = scratch / f"tokens-{index}.json"
        path.write_text(json.dumps([list(ids) for ids in token_ids]), encoding="utf-8")
        files[label] = path
    return files


def cut_to_tokens(token_ids: tuple[tuple[int, ...], ...], target: int) -> list[list[int]]:
    """Take prompts in order, cycling through the set, until exactly ``target`` tokens are taken."""
    prompts: list[list[int]] = []
    total = 0
    index = 0
    while total < target:
        ids = list(token_ids[index % len(token_ids)])[: target - total]
        prompts.append(ids)
        total += len(ids)
        index += 1
    return prompts


def run_kind(kind: str, folder: Path, token_file: Path, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--model", str(folder), "--tokens", str(token_file), "--repeats", str(repeats)]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        tail = finished.stderr.strip().splitlines()[-1:] or [f"exit status {finished.returncode}"]
        return {"error": tail[0]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def run_worker(kind: str, folder: Path, token_file: Path, repeats: int) -> dict:
    """Load the model, run ``kind`` ``repeats`` times, return its times and peak memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_spinal.checkpoints import LoadedCheckpoint
    from pytest_spinal.probes import EncodedProbes

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    token_ids = tuple(tuple(ids) for ids in json.loads(token_file.read_text(encoding="utf-8")))
    encoded = EncodedProbes(token_ids=token_ids, source="benchmark", chat_template=True)
    loaded = LoadedCheckpoint(model=model, tokenizer=tokenizer, name="SmolLM2-135M-Instruct", fingerprint="benchmark")
    after_load = current_rss_bytes()

    measure = MEASUREMENTS[kind]
    prepare = PREPARATIONS.get(kind, lambda loaded, encoded: None)
    prepared = prepare(loaded, encoded)
    if kind == "peer":
        needed = (model.config.num_hidden_layers + 1) * encoded.num_tokens * model.config.vocab_size * 4
        if needed > PEER_LIMIT_BYTES:
            return {"skipped": f"its lens would hold {needed / 2**30:.1f} GiB at once"}

    # Weights mapped from the safetensors file become resident when first read, so read them now.
    # An untimed run over 256 tokens then triggers the runtime's one-time allocations, which are
    # neither weights nor activations (here about 15 MiB stayed allocated after the first products).
    # Then hand freed memory back and restart the high-water mark, so the peak is the measurement's own.
    with torch.inference_mode():
        for parameter in model.parameters():
            parameter.sum()
        warm = EncodedProbes(token_ids=tuple(map(tuple, cut_to_tokens(token_ids, WARM_UP_TOKENS))), source="warm-up", chat_template=True)
        measure(loaded, warm, prepare(loaded, warm))
        del warm
    release_free_memory()
    start_rss = current_rss_bytes()
    peak_is_own = reset_peak_rss()
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            measure(loaded, encoded, prepared)
            times.append(time.perf_counter() - start)
    return {
        "times": times,
        "median": statistics.median(times),
        "rss_after_load": after_load,
        "rss_at_start": start_rss,
        "peak_rss": peak_rss_bytes(),
        "peak_is_own": peak_is_own,
        "chunk_bytes": DEFAULT_CHUNK_SIZE * model.config.vocab_size * 4,
        "gram_bytes": _GramSums.nbytes(model.config.num_hidden_layers + 1, model.config.hidden_size),
    }


def current_rss_bytes() -> int:
    return _status_kib("VmRSS:") * 1024


def peak_rss_bytes() -> int:
    """Return the resident set's high-water mark, since :func:`reset_peak_rss` where that worked, else since the start."""
    peak = _status_kib("VmHWM:") * 1024
    # Linux reports ru_maxrss in KiB.
    return peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident set (Linux 4.0 and later) and return whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Collect garbage and ask glibc to return its free heap memory to the system, as the tracer does (a no-op elsewhere)."""
    import gc

    gc.collect()
    _return_freed_heap()


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def batches(encoded, size: int = 8):
    """Yield left-padded ``(input_ids, attention_mask, position_ids)`` batches as the tracer builds them."""
    from pytest_spinal.tracing import _left_pad

    for start in range(0, len(encoded.token_ids), size):
        input_ids, attention_mask = _left_pad(encoded.token_ids[start : start + size], device="cpu")
        yield input_ids, attention_mask, (attention_mask.cumsum(-1) - 1).clamp(min=0)


def measure_nothing(loaded, encoded, prepared) -> None:
    return None


def measure_forward(loaded, encoded, prepared) -> None:
    for input_ids, attention_mask, position_ids in batches(encoded):
        loaded.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1, use_cache=False)


def measure_roofline_forward(loaded, encoded, prepared) -> None:
    for input_ids, attention_mask, position_ids in batches(encoded):
        loaded.model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True, use_cache=False)


def real_token_states(loaded, encoded) -> list:
    """Return each layer's real-token hidden states (N x d), computed once outside the timing."""
    import torch

    layers = None
    with torch.inference_mode():
        for input_ids, attention_mask, position_ids in batches(encoded):
            output = loaded.model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True, use_cache=False)
            selected = attention_mask.bool()
            states = [hidden[selected] for hidden in output.hidden_states]
            layers = [[state] for state in states] if layers is None else [old + [new] for old, new in zip(layers, states)]
    return [torch.cat(chunks) for chunks in layers]


def measure_roofline_head(loaded, encoded, states) -> None:
    head = loaded.model.get_output_embeddings()
    for layer_states in states[1:]:
        for begin in range(0, layer_states.shape[0], DEFAULT_CHUNK_SIZE):
            head(layer_states[begin : begin + DEFAULT_CHUNK_SIZE])


def measure_roofline_spectra(loaded, encoded, states) -> None:
    from pytest_spinal.metrics import contraction

    for layer_states in states:
        contraction(layer_states)


def measure_trace(loaded, encoded, prepared) -> None:
    from pytest_spinal.trace import TraceSettings
    from pytest_spinal.tracing import trace_loaded

    # A gate run skips the spread; only recording a baseline measures it.
    trace_loaded(loaded, encoded, settings=TraceSettings(), spread=False)


def measure_peer(loaded, encoded, prepared) -> None:
    """Materialise every layer's lens, then compute the same metrics from the stacked tensors."""
    import torch

    from pytest_spinal.metrics import contraction

    states = real_token_states(loaded, encoded)
    model = loaded.model
    logits = torch.stack([model.lm_head(model.model.norm(layer)) for layer in states[:-1]] + [model.lm_head(states[-1])])
    root_probs = torch.softmax(logits, dim=-1).sqrt_()
    chord = torch.linalg.vector_norm(root_probs[1:] - root_probs[:-1], dim=-1)
    transport = (4.0 * torch.asin((chord * 0.5).clamp(max=1.0))).mean(dim=-1)
    profile = [contraction(layer) for layer in states]
    return transport, profile


MEASUREMENTS = {
    "load": measure_nothing,
    "forward": measure_forward,
    "roofline_forward": measure_roofline_forward,
    "roofline_head": measure_roofline_head,
    "roofline_spectra": measure_roofline_spectra,
    "trace": measure_trace,
    "peer": measure_peer,
}
PREPARATIONS = {"roofline_head": real_token_states, "roofline_spectra": real_token_states}


def render(results: dict, arguments: argparse.Namespace) -> str:
    """Format the results as a Markdown section with the command and the machine."""
    lines = [
        "",
        f"## Tracing speed and memory, {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `python benchmarks/trace_speed.py --repeats {arguments.repeats}"
        + (f" --sweep {' '.join(map(str, arguments.sweep))}" if list(arguments.sweep) != list(DEFAULT_SWEEP) else "")
        + "`",
        f"Machine: {machine()}. SmolLM2-135M-Instruct, float32, CPU, batches of 8 prompts, lens chunks of {DEFAULT_CHUNK_SIZE} positions.",
        "Times are medians of the repeated runs, in seconds.",
        "",
        "| probe set | forward | roofline (fwd + head + spectra) | trace | peer | trace / roofline | peer / trace |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [render_row(label, kinds) for label, kinds in results.items()]
    lines += [
        "",
        "Memory in MiB: the resident set when the measurement starts (weights, runtime after a",
        f"{WARM_UP_TOKENS}-token warm-up, inputs), the forward pass's peak above it, two lens chunks of",
        "vocabulary-sized float32 rows, their sum (the bound), the trace's float64 Gram sums that",
        "contraction needs (not in the bound), and the trace's and the peer's peak resident set.",
        "",
        "| probe set | at start | forward peak above start | two chunks | bound | Gram sums | trace peak | within bound | within bound + Gram sums | peer peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [render_memory_row(label, kinds) for label, kinds in results.items()]
    lines.append("")
    return "\n".join(lines)


def render_memory(results: dict, arguments: argparse.Namespace) -> str:
    """Format a partial run as a table of each measurement's median time and peak memory."""
    lines = [
        "",
        f"## Time and peak memory per measurement, {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `python benchmarks/trace_speed.py --repeats {arguments.repeats} --kinds {' '.join(arguments.kinds)}"
        + (f" --sweep {' '.join(map(str, arguments.sweep))}" if list(arguments.sweep) != list(DEFAULT_SWEEP) else "")
        + "`",
        f"Machine: {machine()}. SmolLM2-135M-Instruct, float32, CPU, batches of 8 prompts.",
        "",
        "| probe set | measurement | median s | MiB at start | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for label, kinds in results.items():
        for kind, result in kinds.items():
            if "median" not in result:
                lines.append(f"| {label} | {kind} | {result.get('skipped') or result.get('error', '?')} | - | - |")
                continue
            lines.append(f"| {label} | {kind} | {result['median']:.2f} | {mebibytes(result.get('rss_at_start'))} | {mebibytes(result['peak_rss'])} |")
    lines.append("")
    return "\n".join(lines)


def render_row(label: str, kinds: dict) -> str:
    def median(kind: str) -> float | None:
        return kinds[kind].get("median")

    def seconds(kind: str) -> str:
        value = median(kind)
        return f"{value:.2f}" if value is not None else kinds[kind].get("skipped") or kinds[kind].get("error", "?")

    parts = [median(kind) for kind in ("roofline_forward", "roofline_head", "roofline_spectra")]
    roofline = sum(parts) if all(part is not None for part in parts) else None
    roofline_text = " + ".join(f"{part:.2f}" for part in parts if part is not None)
    roofline_text = f"{roofline:.2f} ({roofline_text})" if roofline is not None else "?"
    trace = median("trace")
    peer = median("peer")
    trace_ratio = f"{trace / roofline:.2f}" if trace and roofline else "-"
    peer_ratio = f"{peer / trace:.2f}" if trace and peer else "-"
    return f"| {label} | {seconds('forward')} | {roofline_text} | {seconds('trace')} | {seconds('peer')} | {trace_ratio} | {peer_ratio} |"


def render_memory_row(label: str, kinds: dict) -> str:
    """Format one row of the memory table. The bound is the trace's own start, plus the forward pass's rise, plus two chunks."""
    forward, trace, peer = kinds["roofline_forward"], kinds["trace"], kinds["peer"]
    if "peak_rss" not in forward or "peak_rss" not in trace:
        return f"| {label} | - | - | - | - | - | - | - | - | - |"
    rise = forward["peak_rss"] - forward["rss_at_start"]
    chunks = 2 * trace["chunk_bytes"]
    bound = trace["rss_at_start"] + rise + chunks
    verdicts = [within(trace["peak_rss"], limit) for limit in (bound, bound + trace["gram_bytes"])]
    if not (forward.get("peak_is_own") and trace.get("peak_is_own")):
        verdicts = ["unknown: the peak could not be reset"] * 2
    peer_peak = mebibytes(peer["peak_rss"]) if "peak_rss" in peer else peer.get("skipped") or peer.get("error", "?")
    return (
        f"| {label} | {mebibytes(trace['rss_at_start'])} | {mebibytes(rise)} | {mebibytes(chunks)} | {mebibytes(bound)} | "
        f"{mebibytes(trace['gram_bytes'])} | {mebibytes(trace['peak_rss'])} | {verdicts[0]} | {verdicts[1]} | {peer_peak} |"
    )


def within(peak: int, limit: int) -> str:
    margin = f"{abs(limit - peak) / 2**20:.0f}"
    return f"yes ({margin} below)" if peak <= limit else f"no ({margin} above)"


def mebibytes(value: int | None) -> str:
    return f"{value / 2**20:.0f}" if value else "-"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
