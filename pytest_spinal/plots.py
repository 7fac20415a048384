"""Draw depth traces as PNG images: one trace, a trace against its baseline, or two traces.

matplotlib is an optional dependency (``pip install matplotlib``). It loads only when
a figure is drawn, and figures render on the Agg canvas, so no display is ever needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pytest_spinal.compare import METRICS, LayerDelta, TraceComparison
from pytest_spinal.errors import SpinalError
from pytest_spinal.tolerance import BAND_NAMES, select_layers
from pytest_spinal.trace import DepthTrace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pytest_spinal.difference import BandShares

#: Command that installs the optional plotting dependency.
PLOT_INSTALL_HINT = "pip install matplotlib (or, in a clone of pytest-spinal, pip install -e '.[plot]')"

#: Resolution of every saved image, in dots per inch.
DPI = 100

#: Size of a trace or gate image in inches: 1000 x 450 pixels at ``DPI``.
TRACE_FIGURE_SIZE = (10.0, 4.5)

#: Size of a two-trace comparison image in inches: 1000 x 750 pixels at ``DPI``.
PAIR_FIGURE_SIZE = (10.0, 7.5)

#: ``gid`` of the scatter artist that marks layers out of tolerance, so tests can find it.
OUT_OF_TOLERANCE_GID = "out-of-tolerance"

#: ``gid`` of the shaded span on the band with the largest share of a metric's change.
LARGEST_BAND_GID = "largest-band"

_BASELINE_COLOR = "#404040"
_OBSERVED_COLOR = "#1f77b4"
_SECOND_COLOR = "#ff7f0e"
_FAILURE_COLOR = "#d62728"
_BAND_COLOR = "#9ecae1"

_Y_LABELS = {
    "contraction": "contraction (spectral tail exponent)",
    "transport": "transport (Fisher-Rao distance, rad)",
}
_X_LABELS = {
    "contraction": "layer",
    "transport": "layer l (step from layer l-1)",
}


class PlottingUnavailable(SpinalError):
    """matplotlib, which drawing images needs, is not installed."""


@dataclass
class TracePlot:
    """A drawn figure and the layers it marks, per metric.

    In a comparison with a baseline, ``marked`` lists the layers drawn as out of tolerance. In a
    two-trace comparison it lists the layers of the band with the largest share of the change.
    """

    figure: Figure
    marked: dict[str, tuple[int, ...]]

    @property
    def pixel_size(self) -> tuple[int, int]:
        """Width and height of the saved PNG, in pixels."""
        width, height = self.figure.get_size_inches()
        return round(width * DPI), round(height * DPI)

    def save(self, path: str | Path) -> Path:
        """Write the figure to ``path`` as a PNG of :attr:`pixel_size`, creating the folder if needed."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.figure.savefig(target, format="png", dpi=DPI)
        return target


def require_matplotlib() -> None:
    """Import matplotlib, or raise :class:`PlottingUnavailable` with the command that installs it."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as error:
        raise PlottingUnavailable(
            f"drawing images needs matplotlib, which is not installed ({error}); install it with {PLOT_INSTALL_HINT}"
        ) from None


def draw_comparison(comparison: TraceComparison, *, title: str | None = None) -> TracePlot:
    """Draw a comparison's observed values against the baseline, per metric.

    Each panel shows the baseline, the observed values, the allowed region shaded around the
    baseline and red markers on layers out of tolerance. Only the layers that the comparison
    covered are drawn.
    """
    figure, axes = _new_figure(TRACE_FIGURE_SIZE, rows=1)
    marked = {}
    for metric, ax in zip(METRICS, axes):
        deltas = sorted((delta for delta in comparison.deltas if delta.metric == metric), key=lambda delta: delta.layer)
        marked[metric] = _draw_metric_comparison(ax, metric, deltas)

    heading = title or f"{comparison.checkpoint} against {comparison.baseline_name}"
    _finish(figure, axes, heading)
    return TracePlot(figure=figure, marked=marked)


def draw_trace(trace: DepthTrace, *, title: str | None = None) -> TracePlot:
    """Draw one trace's contraction and transport against layer, with the depth's thirds marked."""
    figure, axes = _new_figure(TRACE_FIGURE_SIZE, rows=1)
    for metric, ax in zip(METRICS, axes):
        layers, values = _profile(trace, metric)
        ax.plot(layers, values, color=_OBSERVED_COLOR, marker="o", markersize=3, linewidth=1.5)
        _draw_band_edges(ax, trace.num_layers, {band: band for band in BAND_NAMES})
        _label_axes(ax, metric, f"{metric} ({trace.num_layers} layers)")

    _finish(figure, axes, title or _describe_trace(trace))
    return TracePlot(figure=figure, marked={metric: () for metric in METRICS})


def draw_pair(first: DepthTrace, second: DepthTrace, *, labels: tuple[str, str], title: str | None = None) -> TracePlot:
    """Draw two traces (top row) and their per-layer difference ``second - first`` (bottom row).

    The band with the largest share of each metric's total ``|delta|`` (every band of a tie) is
    shaded in the bottom row, and each band's share is written above it.

    Raises:
        SpinalError: when the traces have different numbers of layers.
    """
    from pytest_spinal.difference import band_shares, layer_differences

    differences = layer_differences(first, second)
    shares = band_shares(first, second)
    figure, grid = _new_figure(PAIR_FIGURE_SIZE, rows=2)
    marked = {}
    for column, metric in enumerate(METRICS):
        top, bottom = grid[0][column], grid[1][column]
        rows = differences[metric]
        layers = [row.layer for row in rows]

        top.plot(layers, [row.first for row in rows], color=_OBSERVED_COLOR, marker="o", markersize=3, label=f"A: {labels[0]}")
        top.plot(layers, [row.second for row in rows], color=_SECOND_COLOR, marker="o", markersize=3, label=f"B: {labels[1]}")
        _draw_band_edges(top, first.num_layers, {band: band for band in BAND_NAMES})
        _label_axes(top, metric, metric)
        top.set_xlabel("")

        bottom.bar(layers, [row.delta for row in rows], color=_BASELINE_COLOR, width=0.7, label="B - A")
        bottom.axhline(0.0, color="black", linewidth=0.8)
        marked[metric] = _mark_largest_band(bottom, shares[metric], first.num_layers)
        _label_axes(bottom, metric, f"{metric}: B - A")
        bottom.set_ylabel(f"{metric} difference")

    _finish(figure, list(grid[0]) + list(grid[1]), title or f"A: {labels[0]}  vs  B: {labels[1]}")
    return TracePlot(figure=figure, marked=marked)


def allowed_region(delta: LayerDelta) -> tuple[float, float]:
    """Return the (low, high) range of observed values that pass, with ``inf`` on an unbounded side.

    A one-sided tolerance bounds only the harmful side: contraction may not fall below
    ``baseline - allowed`` and transport may not rise above ``baseline + allowed``.
    """
    low = delta.baseline - delta.allowed
    high = delta.baseline + delta.allowed
    if delta.one_sided:
        if delta.metric == "contraction":
            high = math.inf
        else:
            low = -math.inf
    return low, high


def _new_figure(size: tuple[float, float], *, rows: int) -> tuple[Figure, Any]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, len(METRICS), squeeze=False)
    return figure, (axes[0] if rows == 1 else axes)


def _draw_metric_comparison(ax: Axes, metric: str, deltas: Sequence[LayerDelta]) -> tuple[int, ...]:
    """Draw one metric's baseline, observed values, allowed region and failures, and return the failed layers."""
    if not deltas:
        ax.text(0.5, 0.5, "not compared", transform=ax.transAxes, ha="center", va="center", color="gray")
        _label_axes(ax, metric, metric)
        return ()

    layers = [delta.layer for delta in deltas]
    baseline = _with_gaps(layers, [delta.baseline for delta in deltas])
    observed = _with_gaps(layers, [delta.observed for delta in deltas])
    regions = [allowed_region(delta) for delta in deltas]
    x = _with_gaps(layers, [float(layer) for layer in layers])

    # Unbounded sides of one-sided tolerances are drawn up to the edge of the panel.
    finite = [value for delta in deltas for value in (delta.baseline, delta.observed)]
    finite += [bound for region in regions for bound in region if math.isfinite(bound)]
    bottom, top = _padded_limits(min(finite), max(finite))
    low = _with_gaps(layers, [max(region[0], bottom) for region in regions])
    high = _with_gaps(layers, [min(region[1], top) for region in regions])

    ax.fill_between(x, low, high, color=_BAND_COLOR, alpha=0.45, linewidth=0, label="allowed region")
    ax.plot(x, baseline, color=_BASELINE_COLOR, linestyle="--", linewidth=1.2, label="baseline")
    ax.plot(x, observed, color=_OBSERVED_COLOR, marker="o", markersize=3, linewidth=1.5, label="observed")

    failed = [delta for delta in deltas if not delta.passed]
    if failed:
        points = ax.scatter(
            [delta.layer for delta in failed],
            [delta.observed for delta in failed],
            s=60,
            color=_FAILURE_COLOR,
            edgecolors="black",
            linewidths=0.6,
            zorder=5,
            label="out of tolerance",
        )
        points.set_gid(OUT_OF_TOLERANCE_GID)
    ax.set_ylim(bottom, top)

    summary = f"{len(failed)} of {len(deltas)} layers out of tolerance"
    _label_axes(ax, metric, f"{metric}: {summary}")
    if failed:
        ax.title.set_color(_FAILURE_COLOR)
    return tuple(delta.layer for delta in failed)


def _mark_largest_band(ax: Axes, shares: BandShares, num_layers: int) -> tuple[int, ...]:
    """Label each band with its share of the change, shade the largest and return its layers."""
    labels = {}
    for band in BAND_NAMES:
        share = shares.shares[band]
        labels[band] = f"{band} -" if share is None else f"{band} {share:.0%}"
    largest = shares.largest_bands
    _draw_band_edges(ax, num_layers, labels, bold=largest)

    marked: list[int] = []
    for band in largest:
        layers = shares.band_layers[band]
        span = ax.axvspan(layers[0] - 0.5, layers[-1] + 0.5, color="#fdd835", alpha=0.25, zorder=0)
        span.set_gid(LARGEST_BAND_GID)
        marked.extend(layers)
    return tuple(marked)


def _draw_band_edges(ax: Axes, num_layers: int, labels: dict[str, str], *, bold: Sequence[str] = ()) -> None:
    """Draw dotted lines between the thirds of the depth and name each third above the panel."""
    centers, texts, bands = [], [], []
    for band in BAND_NAMES:
        layers = select_layers(band, num_layers)
        if not layers:
            continue
        if band != BAND_NAMES[-1]:
            ax.axvline(layers[-1] + 0.5, color="gray", linestyle=":", linewidth=0.8)
        centers.append((layers[0] + layers[-1]) / 2)
        texts.append(labels[band])
        bands.append(band)

    top = ax.secondary_xaxis("top")
    top.set_xticks(centers, labels=texts)
    top.tick_params(length=0, labelsize=8, labelcolor="dimgray")
    for band, label in zip(bands, top.get_xticklabels()):
        if band in bold:
            label.set_fontweight("bold")
            label.set_color("black")


def _label_axes(ax: Axes, metric: str, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(_X_LABELS[metric])
    ax.set_ylabel(_Y_LABELS[metric])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _finish(figure: Figure, axes: Sequence[Axes], title: str) -> None:
    """Add the shared legend below the panels and the title above them."""
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    figure.suptitle(_shorten(title, 120), fontsize=10)


def _profile(trace: DepthTrace, metric: str) -> tuple[list[int], list[float]]:
    values = list(getattr(trace, metric))
    first_layer = 0 if metric == "contraction" else 1
    return list(range(first_layer, first_layer + len(values))), values


def _with_gaps(layers: Sequence[int], values: Sequence[float]) -> list[float]:
    """Insert NaN between non-adjacent layers so that lines and shading break there."""
    result: list[float] = []
    for index, (layer, value) in enumerate(zip(layers, values)):
        if index and layer != layers[index - 1] + 1:
            result.append(math.nan)
        result.append(value)
    return result


def _padded_limits(low: float, high: float) -> tuple[float, float]:
    span = high - low
    margin = 0.08 * span if span > 0 else max(0.05 * abs(high), 0.05)
    return low - margin, high + margin


def _describe_trace(trace: DepthTrace) -> str:
    checkpoint = trace.checkpoint
    details = [str(checkpoint.get(key)) for key in ("model_class", "dtype") if checkpoint.get(key)]
    prompts = trace.probes.get("prompts")
    if prompts is not None:
        details.append(f"{prompts} prompts")
    suffix = f" ({', '.join(details)})" if details else ""
    return f"depth trace of {checkpoint.get('name', '?')}{suffix}"


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return text[:keep] + "..." + text[-keep:]
