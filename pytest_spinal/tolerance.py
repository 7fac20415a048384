"""Tolerances for comparing depth traces, per metric and per layer band."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

#: Layer bands by name; ``early``, ``middle`` and ``late`` are the thirds of the decoder layers.
BAND_NAMES = ("early", "middle", "late")

LayerSelection = Union[None, str, slice, range, Sequence[int]]


@dataclass(frozen=True)
class Tolerance:
    """Allowed change of one metric at one layer.

    The fixed part allows ``|observed - baseline| <= atol + rtol * |baseline|``. With ``z > 0``
    the tolerance is ``auto``: it allows ``max(atol + rtol * |baseline|, z * spread)``, where
    ``spread`` is the baseline's measured noise at that layer (see
    :class:`~pytest_spinal.trace.TraceSpread`), so the fixed part is a floor. Against a baseline
    without a spread only the fixed part applies.

    With ``one_sided=True`` only a harmful change fails: a fall of contraction or a rise of
    transport. A change the other way passes whatever its size. ``layers`` limits the tolerance
    to some layers (a band name, a slice or range of layer numbers, or a list of them). When
    several tolerances are given for one metric, the last one that covers a layer applies.
    """

    atol: float = 0.0
    rtol: float = 0.0
    one_sided: bool = False
    layers: LayerSelection = None
    z: float = 0.0

    def __post_init__(self) -> None:
        for name in ("atol", "rtol", "z"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"Tolerance {name}={value!r} is invalid; it must be a finite number >= 0, e.g. {name}={_EXAMPLES[name]}")
        if self.atol == 0 and self.rtol == 0 and self.z == 0:
            raise ValueError("Tolerance(atol=0, rtol=0, z=0) allows no change at all; give atol, rtol or z > 0")
        if isinstance(self.layers, str) and self.layers not in BAND_NAMES:
            raise ValueError(f"Tolerance layers={self.layers!r} is not a band; use one of {', '.join(BAND_NAMES)}, or a slice of layers")

    @property
    def fixed(self) -> bool:
        """Whether the tolerance has a fixed part (``atol`` or ``rtol``) to fall back on."""
        return self.atol > 0 or self.rtol > 0

    def allowed(self, baseline: float, spread: float | None = None) -> float:
        """Return the largest allowed ``|observed - baseline|`` at ``baseline``.

        ``spread`` is the baseline's measured noise at this layer; it counts only when ``z > 0``.
        """
        floor = self.atol + self.rtol * abs(baseline)
        if self.z and spread is not None:
            return max(floor, self.z * spread)
        return floor

    def describe(self) -> str:
        """Return a short text such as ``max(atol 0.02 + rtol 0.05, 3 x spread), one-sided``."""
        parts = []
        if self.atol:
            parts.append(f"atol {self.atol:g}")
        if self.rtol:
            parts.append(f"rtol {self.rtol:g}")
        text = " + ".join(parts)
        if self.z:
            auto = f"{self.z:g} x spread"
            text = f"max({text}, {auto})" if text else auto
        return text + ", one-sided" if self.one_sided else text


_EXAMPLES = {"atol": "0.02", "rtol": "0.03", "z": "4"}


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
