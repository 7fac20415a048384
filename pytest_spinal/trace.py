"""The depth trace: per-layer contraction and transport of one checkpoint on one probe set, and its JSON form."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_spinal.errors import TraceFileError
from pytest_spinal.tolerance import BAND_NAMES, select_layers

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class TraceSettings:
    """Settings that change a trace's values; two traces compare only when these match.

    ``tail_window`` is the (low, high) fraction of the numerical rank whose singular values the
    contraction fit uses. ``positions`` is ``"all"`` (every real token) or ``"last"`` (the last
    token of each prompt). ``metric_dtype`` is the dtype of the logit-lens softmax and distances.
    """

    tail_window: tuple[float, float] = (0.5, 0.9)
    positions: str = "all"
    metric_dtype: str = "float32"

    def __post_init__(self) -> None:
        low, high = self.tail_window
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"tail_window {self.tail_window} is invalid; it needs 0 <= low < high <= 1, e.g. (0.5, 0.9)")
        if self.positions not in ("all", "last"):
            raise ValueError(f"positions {self.positions!r} is invalid; use 'all' or 'last'")
        if self.metric_dtype not in ("float32", "float64"):
            raise ValueError(f"metric_dtype {self.metric_dtype!r} is invalid; use 'float32' or 'float64'")

    def to_json(self) -> dict[str, Any]:
        return {"tail_window": list(self.tail_window), "positions": self.positions, "metric_dtype": self.metric_dtype}


@dataclass(frozen=True)
class TraceSpread:
    """Measured noise of a trace's probe set, per layer: the standard deviation of each metric
    over bootstrap resamples of the prompts.

    Each resample draws as many prompts as the probe set has, with replacement, and recomputes
    contraction (from the drawn prompts' hidden states) and transport (the token-weighted mean of
    the drawn prompts' transport). ``contraction`` has L+1 values and ``transport`` L, like the
    profiles. The ``auto`` part of a :class:`~pytest_spinal.Tolerance` scales these.
    """

    contraction: tuple[float, ...]
    transport: tuple[float, ...]
    resamples: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "bootstrap over prompts",
            "resamples": self.resamples,
            "seed": self.seed,
            "contraction": list(self.contraction),
            "transport": list(self.transport),
        }


@dataclass(frozen=True)
class DepthTrace:
    """One checkpoint's depth trace.

    ``contraction[l]`` is the contraction of layer l for l in 0..L (0 is the embedding output).
    ``transport[l]`` is the mean Fisher-Rao distance between the logit-lens distributions of
    layers l and l+1, for l in 0..L-1, in radians within [0, pi]. ``transport_per_prompt[p][l]``
    is the same mean over the real tokens of prompt p alone. ``spread`` is the probe set's
    measured noise, or ``None`` where it was not computed (see :class:`TraceSpread`).
    """

    contraction: tuple[float, ...]
    transport: tuple[float, ...]
    transport_per_prompt: tuple[tuple[float, ...], ...]
    settings: TraceSettings
    probes: dict[str, Any]
    checkpoint: dict[str, Any]
    environment: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)
    spread: TraceSpread | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_shape(self)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers L; contraction has L+1 values and transport L."""
        return len(self.transport)

    @property
    def path_length(self) -> float:
        """Sum of transport over all layer pairs, in radians: the depth path's length."""
        return math.fsum(self.transport)

    def band_layers(self, band: str) -> list[int]:
        """Return the decoder layers (1..L) of ``band``: the early, middle or late third of the depth."""
        return select_layers(band, self.num_layers)

    def band_means(self) -> dict[str, dict[str, float | None]]:
        """Return mean contraction and transport per band (``None`` for a band with no layer).

        Layer l's contraction and the transport from layer l-1 into layer l count towards the
        band of layer l, so the embedding output (layer 0) is in no band.
        """
        means = {}
        for band in BAND_NAMES:
            layers = self.band_layers(band)
            if not layers:
                means[band] = {"contraction": None, "transport": None}
                continue
            means[band] = {
                "contraction": math.fsum(self.contraction[layer] for layer in layers) / len(layers),
                "transport": math.fsum(self.transport[layer - 1] for layer in layers) / len(layers),
            }
        return means

    def checksum(self) -> str:
        """``sha256:<hex>`` of the profiles, so that a hand edit of any value is detected on read."""
        spread = None if self.spread is None else self.spread.to_json()
        payload = json.dumps([self.contraction, self.transport, self.transport_per_prompt, spread], separators=(",", ":"))
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

    def derived(self) -> dict[str, Any]:
        """Return the figures derived from the profiles, as written to JSON."""
        return {"path_length": self.path_length, "band_means": self.band_means()}

    def to_json(self) -> dict[str, Any]:
        """Return the trace as plain JSON types, keys in a fixed order."""
        return {
            "schema_version": self.schema_version,
            "num_layers": self.num_layers,
            "contraction": list(self.contraction),
            "transport": list(self.transport),
            "transport_per_prompt": [list(row) for row in self.transport_per_prompt],
            "spread": None if self.spread is None else self.spread.to_json(),
            "derived": self.derived(),
            "checksum": self.checksum(),
            "settings": self.settings.to_json(),
            "probes": dict(self.probes),
            "checkpoint": dict(self.checkpoint),
            "environment": dict(self.environment),
            "run": dict(self.run),
        }

    def dumps(self) -> str:
        """Serialise to JSON text; floats use the shortest repr that reads back exactly."""
        try:
            return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        except ValueError as error:
            raise TraceFileError(f"depth trace contains NaN or infinity, which JSON cannot represent: {error}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to ``path`` atomically (temporary file in the same folder, then rename)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = self.dumps()
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
        return target

    @classmethod
    def from_json(cls, data: Any, *, source: str = "<json>") -> DepthTrace:
        """Build a trace from parsed JSON, checking schema, shapes and derived figures."""
        if not isinstance(data, dict):
            raise TraceFileError(f"{source}: a depth trace is a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TraceFileError(
                f"{source}: schema_version {version!r} is not supported (this pytest-spinal reads "
                f"version {SCHEMA_VERSION}); re-record the trace with this version"
            )

        try:
            settings = data["settings"]
            trace = cls(
                contraction=_floats(data["contraction"], "contraction", source),
                transport=_floats(data["transport"], "transport", source),
                transport_per_prompt=tuple(
                    _floats(row, "transport_per_prompt", source) for row in data["transport_per_prompt"]
                ),
                settings=TraceSettings(
                    tail_window=tuple(settings["tail_window"]),
                    positions=settings["positions"],
                    metric_dtype=settings["metric_dtype"],
                ),
                probes=dict(data["probes"]),
                checkpoint=dict(data["checkpoint"]),
                environment=dict(data["environment"]),
                run=dict(data.get("run", {})),
                spread=_spread_from_json(data["spread"], source),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise TraceFileError(f"{source}: not a valid depth trace ({type(error).__name__}: {error})") from None

        if data.get("num_layers") != trace.num_layers:
            raise TraceFileError(f"{source}: num_layers is {data.get('num_layers')!r} but transport has {trace.num_layers} values")
        if data.get("derived") != trace.derived() or data.get("checksum") != trace.checksum():
            raise TraceFileError(
                f"{source}: the checksum or derived figures do not match the profiles, so the file "
                f"was edited by hand or is corrupt; re-record it"
            )
        return trace

    @classmethod
    def loads(cls, text: str, *, source: str = "<json>") -> DepthTrace:
        """Parse JSON text; NaN and Infinity are rejected."""
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as error:
            raise TraceFileError(f"{source}: invalid JSON ({error})") from None
        return cls.from_json(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DepthTrace:
        """Read a trace from a JSON file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TraceFileError(f"depth trace file {str(path)!r} not found") from None
        except (OSError, UnicodeDecodeError) as error:
            raise TraceFileError(f"depth trace file {str(path)!r} could not be read: {error}") from None
        return cls.loads(text, source=str(path))


def _spread_from_json(data: Any, source: str) -> TraceSpread | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise TraceFileError(f"{source}: spread must be a JSON object or null, got {type(data).__name__}")
    return TraceSpread(
        contraction=_floats(data["contraction"], "spread.contraction", source),
        transport=_floats(data["transport"], "spread.transport", source),
        resamples=int(data["resamples"]),
        seed=int(data["seed"]),
    )


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def _floats(values: Any, name: str, source: str) -> tuple[float, ...]:
    if not isinstance(values, list):
        raise TraceFileError(f"{source}: {name} must be a list of numbers, got {type(values).__name__}")
    result = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TraceFileError(f"{source}: {name}[{index}] is {value!r}, not a finite number")
        result.append(float(value))
    return tuple(result)


def _check_shape(trace: DepthTrace) -> None:
    layers = len(trace.transport)
    if layers < 1:
        raise ValueError("a depth trace needs at least one layer pair of transport")
    if len(trace.contraction) != layers + 1:
        raise ValueError(f"contraction has {len(trace.contraction)} values but needs {layers + 1} (layers 0..{layers})")
    for index, row in enumerate(trace.transport_per_prompt):
        if len(row) != layers:
            raise ValueError(f"transport_per_prompt[{index}] has {len(row)} values but needs {layers}")
    rows = [(f"transport_per_prompt[{index}]", row) for index, row in enumerate(trace.transport_per_prompt)]
    if trace.spread is not None:
        if len(trace.spread.contraction) != layers + 1 or len(trace.spread.transport) != layers:
            raise ValueError(
                f"spread has {len(trace.spread.contraction)} contraction and {len(trace.spread.transport)} "
                f"transport values but needs {layers + 1} and {layers}"
            )
        rows += [("spread.contraction", trace.spread.contraction), ("spread.transport", trace.spread.transport)]
        if any(value < 0 for _, values in rows[-2:] for value in values):
            raise ValueError("spread values are standard deviations and cannot be negative")
    for name, values in [("contraction", trace.contraction), ("transport", trace.transport), *rows]:
        for index, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(f"{name}[{index}] is {value!r}; every value of a depth trace must be finite")
