"""Per-layer difference of two depth traces, and which third of the depth contains most of it.

Used by ``spinal compare`` to show where two checkpoints differ, for example a base model and
its preference-tuned version. Both traces must have the same number of layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pytest_spinal.compare import METRICS
from pytest_spinal.errors import SpinalError
from pytest_spinal.tolerance import BAND_NAMES, select_layers
from pytest_spinal.trace import DepthTrace


@dataclass(frozen=True)
class LayerDifference:
    """One metric at one layer of two traces: ``delta`` is ``second - first``.

    For transport, ``layer`` is the destination of the step, so layer l has the transport from
    layer l-1 to layer l and layer 0 has none, as in gate comparisons.
    """

    metric: str
    layer: int
    first: float
    second: float

    @property
    def delta(self) -> float:
        return self.second - self.first


@dataclass(frozen=True)
class BandShares:
    """Share of one metric's total ``|delta|`` over layers 1..L that falls in each band.

    ``shares`` maps each band name to a fraction in [0, 1], or to ``None`` for every band when
    the total is 0. Layer 0 (the embedding output) is in no band, so its contraction change is
    not part of ``total``.
    """

    metric: str
    total: float
    shares: dict[str, float | None]
    band_layers: dict[str, list[int]]

    @property
    def largest_bands(self) -> tuple[str, ...]:
        """The band with the largest share, all of them when tied, or ``()`` when nothing changed."""
        if self.total == 0:
            return ()
        largest = max(self.shares[band] or 0.0 for band in BAND_NAMES)
        return tuple(band for band in BAND_NAMES if math.isclose(self.shares[band] or 0.0, largest, rel_tol=1e-9))


def layer_differences(first: DepthTrace, second: DepthTrace) -> dict[str, list[LayerDifference]]:
    """Pair the two traces layer by layer, per metric.

    Raises:
        SpinalError: when the traces have different numbers of layers.
    """
    if first.num_layers != second.num_layers:
        raise SpinalError(
            f"the traces have different layer counts ({first.num_layers} and {second.num_layers}), "
            f"so they have no per-layer difference"
        )
    differences = {}
    for metric in METRICS:
        first_layer = 0 if metric == "contraction" else 1
        pairs = zip(getattr(first, metric), getattr(second, metric))
        differences[metric] = [
            LayerDifference(metric=metric, layer=index + first_layer, first=a, second=b)
            for index, (a, b) in enumerate(pairs)
        ]
    return differences


def band_shares(first: DepthTrace, second: DepthTrace) -> dict[str, BandShares]:
    """Split each metric's total ``|second - first|`` over layers 1..L into the early, middle and late bands."""
    differences = layer_differences(first, second)
    bands = {band: select_layers(band, first.num_layers) for band in BAND_NAMES}
    result = {}
    for metric, rows in differences.items():
        by_layer = {row.layer: abs(row.delta) for row in rows}
        sums = {band: math.fsum(by_layer[layer] for layer in layers) for band, layers in bands.items()}
        total = math.fsum(sums.values())
        shares = {band: (sums[band] / total if total > 0 else None) for band in BAND_NAMES}
        result[metric] = BandShares(metric=metric, total=total, shares=shares, band_layers=bands)
    return result


def format_difference(first: DepthTrace, second: DepthTrace, labels: tuple[str, str]) -> str:
    """Render the per-layer table of both traces and their difference, then the band shares."""
    from tabulate import tabulate

    differences = layer_differences(first, second)
    transport_by_layer = {row.layer: row for row in differences["transport"]}
    rows = []
    for row in differences["contraction"]:
        step = transport_by_layer.get(row.layer)
        rows.append(
            (
                row.layer,
                row.first,
                row.second,
                row.delta,
                step.first if step else None,
                step.second if step else None,
                step.delta if step else None,
            )
        )
    table = tabulate(
        rows,
        headers=("layer", "contraction A", "contraction B", "B - A", "transport A", "transport B", "B - A"),
        floatfmt=("", ".4f", ".4f", "+.4f", ".4f", ".4f", "+.4f"),
        missingval="",
    )

    lines = [
        f"A: {labels[0]} ({_describe_checkpoint(first)})",
        f"B: {labels[1]} ({_describe_checkpoint(second)})",
        "transport of layer l is the step from layer l-1 to layer l",
        "",
        table,
        "",
        format_band_shares(band_shares(first, second), first.num_layers),
    ]
    layer_zero = differences["contraction"][0]
    if layer_zero.delta:
        lines.append(
            f"layer 0 (embedding output) is in no band: its contraction change {layer_zero.delta:+.4f} is not counted"
        )
    return "\n".join(lines)


def format_band_shares(shares: dict[str, BandShares], num_layers: int) -> str:
    """Render the band shares as a table, with ``*`` on the band with the largest share of each metric."""
    from tabulate import tabulate

    any_shares = next(iter(shares.values()))
    headers = ["metric"]
    for band in BAND_NAMES:
        layers = any_shares.band_layers[band]
        headers.append(f"{band} ({layers[0]}-{layers[-1]})" if layers else f"{band} (no layers)")
    headers.append("total |B - A|")

    rows = []
    for metric in METRICS:
        entry = shares[metric]
        cells = [metric]
        for band in BAND_NAMES:
            share = entry.shares[band]
            marker = " *" if band in entry.largest_bands else ""
            cells.append("-" if share is None else f"{share:.1%}{marker}")
        cells.append(f"{entry.total:.4f}")
        rows.append(cells)

    lines = [
        f"localisation: share of each metric's total |B - A| over layers 1-{num_layers}, by third of the depth",
        tabulate(rows, headers=headers, disable_numparse=True),
        "* the band with the largest share (every band of a tie)",
    ]
    for metric in METRICS:
        entry = shares[metric]
        largest = entry.largest_bands
        if not largest:
            lines.append(f"{metric}: no change")
        elif len(largest) == 1:
            lines.append(f"{metric}: the largest share of the change is in the {largest[0]} band ({entry.shares[largest[0]]:.1%})")
        else:
            lines.append(f"{metric}: the change is split equally between the {' and '.join(largest)} bands ({entry.shares[largest[0]]:.1%} each)")
    return "\n".join(lines)


def _describe_checkpoint(trace: DepthTrace) -> str:
    checkpoint = trace.checkpoint
    details = [str(checkpoint.get(key)) for key in ("name", "model_class", "dtype") if checkpoint.get(key)]
    details.append(f"{trace.num_layers} layers")
    return ", ".join(details)
