"""Prove the release gate on SmolLM2-135M-Instruct: harmless variants pass, regressions fail.

Derives checkpoint variants from the packaged SmolLM2-135M-Instruct and traces each over the
default probes on the CPU. Each trace is compared with the unchanged checkpoint's trace twice:
under the fixed part of the tolerances alone, and under the ``auto`` tolerances
(``max(fixed part, z x spread)``).

- harmless: re-saved as safetensors and reloaded; traced in bfloat16; traced in batches of 3
  rather than 8; traced with the probes shuffled;
- regressions: the variants of ``spinal_variants.REGRESSIONS``. They are a few steps of DPO with
  chosen and rejected swapped on ``data/preferences.jsonl``, a few steps of next-token
  fine-tuning on ``data/unrelated_text.txt``, and Gaussian noise on every weight of decoder
  layers 26-30 or of layers 1-5.

Every trace is saved under ``--traces`` (default ``benchmarks/results/gate_variants``), so that
``--reuse`` can tabulate again, for instance with other tolerances, without tracing:

    python benchmarks/gate_variants.py --markdown BENCHMARKS.md
    python benchmarks/gate_variants.py --reuse --contraction-z 3 --transport-z 3
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import spinal_variants
from trace_speed import machine

RESULTS_FOLDER = Path(__file__).resolve().parent / "results" / "gate_variants"


@dataclass(frozen=True)
class Variant:
    """One derived checkpoint or tracing change, and the verdict the gate must return for it."""

    name: str
    harmless: bool
    description: str
    # The band whose layers a regression must be flagged in first, or None where any layer will do.
    expected_band: str | None = None


VARIANTS = (
    Variant("resaved", True, "re-saved as safetensors and reloaded"),
    Variant("bfloat16", True, "the re-saved model loaded and traced in bfloat16"),
    Variant("batch-size-3", True, "traced in batches of 3 prompts rather than 8"),
    Variant("probes-shuffled", True, "traced with the probes in a shuffled order (seed 0)"),
    *(
        Variant(name, False, description, expected_band={"noise-late": "late", "noise-early": "early"}.get(name))
        for name, description in spinal_variants.REGRESSIONS.items()
    ),
)

REFERENCE = "reference"


def main() -> int:
    from pytest_spinal.compare import BUILTIN_TOLERANCES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=RESULTS_FOLDER, help="folder of the saved traces (default: %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="read the traces saved in --traces rather than tracing again")
    parser.add_argument("--only", nargs="*", choices=[variant.name for variant in VARIANTS], help="trace only these variants")
    parser.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    for metric in ("contraction", "transport"):
        default = BUILTIN_TOLERANCES[metric]
        parser.add_argument(f"--{metric}-z", type=float, default=default.z, help=f"z of the auto {metric} tolerance (default: %(default)s)")
        parser.add_argument(f"--{metric}-atol", type=float, default=default.atol, help=f"atol of the {metric} floor (default: %(default)s)")
        parser.add_argument(f"--{metric}-rtol", type=float, default=default.rtol, help=f"rtol of the {metric} floor (default: %(default)s)")
    arguments = parser.parse_args()

    selected = [variant for variant in VARIANTS if not arguments.only or variant.name in arguments.only]
    if not arguments.reuse:
        trace_variants(selected, arguments.traces)
    results = tabulate_variants(selected, arguments)
    text = render(results, arguments)
    print(text)
    if arguments.markdown:
        with open(arguments.markdown, "a", encoding="utf-8") as stream:
            stream.write(text)
    return 0 if all(result["target_met"] for result in results) else 1


# Tracing


def trace_variants(variants: list[Variant], folder: Path) -> None:
    """Trace the reference and each variant, saving ``NAME.json`` and ``NAME.stats.json`` in ``folder``."""
    from pytest_spinal.checkpoints import DEFAULT_CHECKPOINT, load_checkpoint
    from pytest_spinal.probes import EncodedProbes, encode_probes, load_probes
    from pytest_spinal.trace import TraceSettings
    from pytest_spinal.tracing import trace_loaded

    folder.mkdir(parents=True, exist_ok=True)
    base = load_checkpoint(DEFAULT_CHECKPOINT, device="cpu")
    encoded = encode_probes(base.tokenizer, load_probes())

    def trace(name: str, loaded: Any, statistics: dict | None = None, *, probes: EncodedProbes = encoded, batch_size: int = 8) -> None:
        print(f"tracing {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = trace_loaded(loaded, probes, settings=TraceSettings(), batch_size=batch_size, spread=name == REFERENCE)
        result.save(folder / f"{name}.json")
        statistics = {"checkpoint": loaded.name, "trace_seconds": time.perf_counter() - started, **(statistics or {})}
        (folder / f"{name}.stats.json").write_text(json.dumps(statistics, indent=2) + "\n", encoding="utf-8")

    trace(REFERENCE, base)
    with tempfile.TemporaryDirectory(prefix="spinal-variants-") as scratch:
        builders: dict[str, Callable[[], None]] = {
            "resaved": lambda: trace("resaved", _resaved(base, Path(scratch), dtype="float32")),
            "bfloat16": lambda: trace("bfloat16", _resaved(base, Path(scratch), dtype="bfloat16")),
            "batch-size-3": lambda: trace("batch-size-3", base, batch_size=3),
            "probes-shuffled": lambda: trace("probes-shuffled", base, probes=_shuffled(encoded)),
            **{name: _regression_builder(name, base, trace) for name in spinal_variants.REGRESSIONS},
        }
        for variant in variants:
            builders[variant.name]()


def _resaved(base: Any, scratch: Path, *, dtype: str) -> Any:
    from pytest_spinal.checkpoints import load_checkpoint

    folder = scratch / "resaved"
    if not folder.exists():
        spinal_variants.save_as_safetensors(base, folder)
    return load_checkpoint(folder, device="cpu", dtype=dtype)


def _shuffled(encoded: Any) -> Any:
    from pytest_spinal.probes import EncodedProbes

    order = list(range(len(encoded.token_ids)))
    random.Random(0).shuffle(order)
    return EncodedProbes(
        token_ids=tuple(encoded.token_ids[index] for index in order), source=encoded.source, chat_template=encoded.chat_template
    )


def _regression_builder(name: str, base: Any, trace: Callable) -> Callable[[], None]:
    def build() -> None:
        variant, statistics = spinal_variants.derive_regression(name, base)
        trace(name, variant, statistics)

    return build


# Comparison


def tabulate_variants(variants: list[Variant], arguments: argparse.Namespace) -> list[dict[str, Any]]:
    """Compare each saved variant trace with the reference under the fixed and the auto tolerances."""
    from pytest_spinal.tolerance import Tolerance
    from pytest_spinal.trace import DepthTrace

    folder = arguments.traces
    reference = DepthTrace.load(folder / f"{REFERENCE}.json")
    modes = {}
    for mode in ("fixed", "auto"):
        modes[mode] = {
            metric: Tolerance(
                atol=getattr(arguments, f"{metric}_atol"),
                rtol=getattr(arguments, f"{metric}_rtol"),
                z=getattr(arguments, f"{metric}_z") if mode == "auto" else 0.0,
            )
            for metric in ("contraction", "transport")
        }

    results = []
    for variant in variants:
        observed = DepthTrace.load(folder / f"{variant.name}.json")
        statistics = json.loads((folder / f"{variant.name}.stats.json").read_text(encoding="utf-8"))
        result: dict[str, Any] = {"variant": variant, "statistics": statistics}
        for mode, tolerances in modes.items():
            comparison = _compare(observed, reference, tolerances)
            result[mode] = comparison
        result["max_delta"] = {
            metric: max(abs(delta.delta) for delta in result["fixed"].deltas if delta.metric == metric)
            for metric in ("contraction", "transport")
        }
        result["max_z"] = {
            metric: max(abs(delta.delta) / delta.spread for delta in result["auto"].deltas if delta.metric == metric and delta.spread)
            for metric in ("contraction", "transport")
        }
        result["target_met"] = all(_target_met(variant, result[mode], reference) for mode in modes)
        results.append(result)
    return results


def _compare(observed: Any, reference: Any, tolerances: dict) -> Any:
    from pytest_spinal.compare import compare_traces

    return compare_traces(observed, reference, baseline_name=REFERENCE, **tolerances)


def _target_met(variant: Variant, comparison: Any, reference: Any) -> bool:
    if variant.harmless:
        return comparison.passed
    if comparison.passed:
        return False
    if variant.expected_band is None:
        return True
    first = min(delta.layer for delta in comparison.failures)
    return first in reference.band_layers(variant.expected_band)


# Rendering


def render(results: list[dict[str, Any]], arguments: argparse.Namespace) -> str:
    """Return the Markdown section: command, machine, tolerances, then one row per variant."""
    from pytest_spinal.trace import DepthTrace

    reference = DepthTrace.load(arguments.traces / f"{REFERENCE}.json")
    fixed = {metric: results[0]["fixed"].tolerances[metric] for metric in ("contraction", "transport")} if results else {}
    auto = {metric: results[0]["auto"].tolerances[metric] for metric in ("contraction", "transport")} if results else {}
    command = "python benchmarks/gate_variants.py " + " ".join(sys.argv[1:])
    lines = [
        "",
        f"## Gate verdicts on SmolLM2-135M-Instruct variants, {time.strftime('%Y-%m-%d')}",
        "",
        f"Command: `{command.strip()}`",
        *(
            [f"The traces were read from `{_display(arguments.traces)}`, where an earlier run of the script without `--reuse` saved them."]
            if arguments.reuse
            else []
        ),
        f"Machine: {machine()}. Every trace is float32 on the CPU over the default probes "
        f"({reference.probes.get('prompts')} prompts, {reference.probes.get('tokens')} tokens) unless the variant says otherwise; "
        f"the reference is the unchanged checkpoint, traced with its spread ({reference.spread.resamples if reference.spread else 0} resamples).",
        "",
        f"Fixed: contraction {fixed.get('contraction')}, transport {fixed.get('transport')}. "
        f"Auto: contraction {auto.get('contraction')}, transport {auto.get('transport')}.",
        "Layers flagged are listed as `c` (contraction, layer l) and `t` (transport into layer l); "
        "max |delta|/spread is the largest z-score over the layers.",
        "",
        "| variant | kind | max abs delta: contraction | transport | max abs delta / spread: contraction | transport "
        "| fixed: flagged | worst abs delta / allowed | verdict | auto: flagged | worst abs delta / allowed | verdict | target met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        variant = result["variant"]
        lines.append(
            f"| {variant.name}: {variant.description} | {'harmless' if variant.harmless else 'regression'} "
            f"| {_number(result['max_delta']['contraction'])} | {_number(result['max_delta']['transport'])} "
            f"| {result['max_z']['contraction']:.2f} | {result['max_z']['transport']:.2f} "
            f"| {_flagged(result['fixed'])} | {result['fixed'].worst.excess:.2f} | {_verdict(result['fixed'])} "
            f"| {_flagged(result['auto'])} | {result['auto'].worst.excess:.2f} | {_verdict(result['auto'])} "
            f"| {'yes' if result['target_met'] else 'NO'} |"
        )
    lines += ["", *_training_notes(results), ""]
    return "\n".join(lines)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _number(value: float) -> str:
    """Format a delta with 4 decimals, or in scientific notation when it is below 0.0001 but not 0."""
    return f"{value:.1e}" if 0 < value < 1e-4 else f"{value:.4f}"


def _flagged(comparison: Any) -> str:
    from pytest_spinal.report import format_layers

    parts = []
    for metric, letter in (("contraction", "c"), ("transport", "t")):
        layers = [delta.layer for delta in comparison.failures if delta.metric == metric]
        if layers:
            parts.append(f"{letter} {format_layers(layers)}")
    return "; ".join(parts) or "-"


def _verdict(comparison: Any) -> str:
    return "pass" if comparison.passed else "FAIL"


def _training_notes(results: list[dict[str, Any]]) -> list[str]:
    notes = []
    for result in results:
        statistics = result["statistics"]
        name = result["variant"].name
        if "positive_margin_before" in statistics:
            notes.append(
                f"- {name}: the share of training pairs whose log-probability margin favours the chosen "
                f"answer went from {statistics['positive_margin_before']:.0%} to {statistics['positive_margin_after']:.0%} "
                f"(mean margin {statistics['mean_margin_before']:+.2f} to {statistics['mean_margin_after']:+.2f} nats) "
                f"in {statistics['seconds']:.0f} s of training."
            )
        if "loss_before" in statistics:
            notes.append(
                f"- {name}: next-token loss on the training text went from {statistics['loss_before']:.3f} "
                f"to {statistics['loss_after']:.3f} nats in {statistics['seconds']:.0f} s of training."
            )
    return notes


if __name__ == "__main__":
    sys.exit(main())
