"""Tolerances for comparing depth traces, per metric and per layer band."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

#: Layer bands by name; ``early``, ``middle`` and ``late`` are the thirds of the decoder layers.
BAND_NAMES = ("early", "middle", "late")

LayerSelection = Union[None, str, slice, range, Sequence[int]]


@dataclass(frozen=True)
class Tolerance:
    """Allowed change of one metric: ``|observed - baseline| <= atol + rtol * |baseline|``.

    With ``one_sided=True`` only a harmful change fails: a fall of contraction or a rise of
    transport; a change the other way passes whatever its size. ``layers`` limits the tolerance
    to some layers (a band name, a slice or range of layer numbers, or a list of them). When
    several tolerances are given for one metric, the last one that covers a layer applies.
    """

    atol: float = 0.0
    rtol: float = 0.0
    one_sided: bool = False
    layers: LayerSelection = None

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"Tolerance {name}={value!r} is invalid; it must be a number >= 0, e.g. {name}=0.02")
        if self.atol == 0 and self.rtol == 0:
            raise ValueError("Tolerance(atol=0, rtol=0) allows no change at all; give atol or rtol > 0")
        if isinstance(self.layers, str) and self.layers not in BAND_NAMES:
            raise ValueError(f"Tolerance layers={self.layers!r} is not a band; use one of {', '.join(BAND_NAMES)}, or a slice of layers")

    def allowed(self, baseline: float) -> float:
        """Return the largest allowed ``|observed - baseline|`` at ``baseline``."""
        return self.atol + self.rtol * abs(baseline)

    def describe(self) -> str:
        """Return a short text such as ``atol 0.02 + rtol 0.05, one-sided``."""
        parts = []
        if self.atol:
            parts.append(f"atol {self.atol:g}")
        if self.rtol:
            parts.append(f"rtol {self.rtol:g}")
        text = " + ".join(parts)
        return text + ", one-sided" if self.one_sided else text


def select_layers(selection: LayerSelection, num_layers: int) -> list[int]:
    """Return the layer numbers (0..num_layers) that ``selection`` names, in increasing order.

    ``None`` is every layer. A band name is that third of layers 1..num_layers. A slice applies
    to the list ``[0, 1, ..., num_layers]``, so ``slice(-10, None)`` is the last ten layers.
    """
    every = list(range(num_layers + 1))
    if selection is None:
        return every
    if isinstance(selection, str):
        if selection not in BAND_NAMES:
            raise ValueError(f"layer band {selection!r} is unknown; use one of {', '.join(BAND_NAMES)}")
        index = BAND_NAMES.index(selection)
        bounds = [round(num_layers * part / 3) for part in range(4)]
        return list(range(bounds[index] + 1, bounds[index + 1] + 1))
    if isinstance(selection, slice):
        return every[selection]

    layers = sorted(set(int(layer) for layer in selection))
    outside = [layer for layer in layers if not 0 <= layer <= num_layers]
    if outside:
        raise ValueError(f"layers {outside} are outside 0..{num_layers} for a trace of {num_layers} layers")
    return layers


def tolerance_per_layer(
    tolerances: Tolerance | Sequence[Tolerance], num_layers: int
) -> dict[int, Tolerance]:
    """Map each layer number to the tolerance that applies to it (the last one covering it)."""
    if isinstance(tolerances, Tolerance):
        tolerances = [tolerances]
    mapping: dict[int, Tolerance] = {}
    for tolerance in tolerances:
        if not isinstance(tolerance, Tolerance):
            raise TypeError(f"expected Tolerance objects, got {tolerance!r}; write Tolerance(atol=..., rtol=...)")
        for layer in select_layers(tolerance.layers, num_layers):
            mapping[layer] = tolerance
    return mapping
