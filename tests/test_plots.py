"""Tests of the depth-trace images drawn with matplotlib, on a real trace of the tiny llama."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest

from pytest_spinal import Tolerance, compare_traces, trace_checkpoint
from pytest_spinal.compare import LayerDelta
from pytest_spinal.plots import (
    LARGEST_BAND_GID,
    OUT_OF_TOLERANCE_GID,
    PLOT_INSTALL_HINT,
    PlottingUnavailable,
    allowed_region,
    draw_comparison,
    draw_pair,
    draw_trace,
)
from pytest_spinal.trace import DepthTrace

from png_files import png_size
from tiny_models import tiny_model_path

#: Change of contraction at layer 3 and of transport 3->4 in the drifted trace; each is several
#: times the default allowed change (atol 0.02 + rtol 0.03 of the baseline).
CONTRACTION_DROP = 0.3
TRANSPORT_RISE = 0.2


@pytest.fixture(scope="module")
def llama_trace() -> DepthTrace:
    return trace_checkpoint(tiny_model_path("llama"), device="cpu")


def shifted(trace: DepthTrace, *, contraction: dict[int, float] | None = None, transport: dict[int, float] | None = None) -> DepthTrace:
    """Return ``trace`` with values added per layer; transport is keyed by destination layer."""
    new_contraction = list(trace.contraction)
    for layer, change in (contraction or {}).items():
        new_contraction[layer] += change
    new_transport = list(trace.transport)
    for layer, change in (transport or {}).items():
        new_transport[layer - 1] += change
    return dataclasses.replace(trace, contraction=tuple(new_contraction), transport=tuple(new_transport))


@pytest.fixture(scope="module")
def drifted_trace(llama_trace) -> DepthTrace:
    return shifted(llama_trace, contraction={3: -CONTRACTION_DROP}, transport={4: TRANSPORT_RISE})


def artists_with_gid(plot, gid: str) -> list:
    return [artist for ax in plot.figure.axes for artist in ax.get_children() if artist.get_gid() == gid]


def line_with_label(ax, label: str):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_comparison_marks_failed_layers(llama_trace, drifted_trace):
    comparison = compare_traces(drifted_trace, llama_trace)

    plot = draw_comparison(comparison)

    assert plot.marked == {"contraction": (3,), "transport": (4,)}


def test_comparison_markers_at_observed_values(llama_trace, drifted_trace):
    plot = draw_comparison(compare_traces(drifted_trace, llama_trace))

    markers = artists_with_gid(plot, OUT_OF_TOLERANCE_GID)
    assert len(markers) == 2
    contraction_axes, transport_axes = plot.figure.axes[:2]
    assert markers[0].axes is contraction_axes
    assert markers[1].axes is transport_axes
    assert markers[0].get_offsets().tolist() == [[3.0, drifted_trace.contraction[3]]]
    assert markers[1].get_offsets().tolist() == [[4.0, drifted_trace.transport[3]]]


def test_failed_panel_titles_count_layers(llama_trace, drifted_trace):
    plot = draw_comparison(compare_traces(drifted_trace, llama_trace))

    titles = [ax.get_title() for ax in plot.figure.axes[:2]]
    assert titles == ["contraction: 1 of 5 layers out of tolerance", "transport: 1 of 4 layers out of tolerance"]


def test_passing_comparison_marks_nothing(llama_trace):
    plot = draw_comparison(compare_traces(llama_trace, llama_trace))

    assert plot.marked == {"contraction": (), "transport": ()}
    assert artists_with_gid(plot, OUT_OF_TOLERANCE_GID) == []


def test_comparison_png_size(llama_trace, drifted_trace, tmp_path):
    plot = draw_comparison(compare_traces(drifted_trace, llama_trace))

    path = plot.save(tmp_path / "images" / "gate.png")

    assert path == tmp_path / "images" / "gate.png"
    assert png_size(path) == (1000, 450)
    assert plot.pixel_size == (1000, 450)


def test_one_sided_harmless_change_unmarked(llama_trace):
    # Transport falling is harmless under a one-sided tolerance, however far it falls.
    lower = shifted(llama_trace, transport={4: -TRANSPORT_RISE})
    comparison = compare_traces(lower, llama_trace, transport=Tolerance(atol=0.02, one_sided=True))

    plot = draw_comparison(comparison)

    assert plot.marked == {"contraction": (), "transport": ()}


def test_compared_layers_only_drawn(llama_trace, drifted_trace):
    plot = draw_comparison(compare_traces(drifted_trace, llama_trace, layers=[0, 1, 3, 4]))

    contraction_axes, transport_axes = plot.figure.axes[:2]
    drawn = [x for x in line_with_label(contraction_axes, "observed").get_xdata() if not math.isnan(x)]
    assert drawn == [0, 1, 3, 4]
    drawn = [x for x in line_with_label(transport_axes, "observed").get_xdata() if not math.isnan(x)]
    assert drawn == [1, 3, 4]
    assert plot.marked == {"contraction": (3,), "transport": (4,)}


@pytest.mark.parametrize(
    ("metric", "one_sided", "expected"),
    [
        ("contraction", False, (0.9, 1.1)),
        ("transport", False, (0.9, 1.1)),
        ("contraction", True, (0.9, math.inf)),
        ("transport", True, (-math.inf, 1.1)),
    ],
)
def test_allowed_region_sides(metric, one_sided, expected):
    delta = LayerDelta(metric=metric, layer=1, baseline=1.0, observed=1.0, allowed=0.1, one_sided=one_sided)

    assert allowed_region(delta) == pytest.approx(expected)


def test_trace_png_size(llama_trace, tmp_path):
    plot = draw_trace(llama_trace)

    path = plot.save(tmp_path / "trace.png")

    assert png_size(path) == (1000, 450)
    assert plot.marked == {"contraction": (), "transport": ()}


def test_pair_marks_band_of_change(llama_trace, drifted_trace, tmp_path):
    # With 4 layers the bands are early (1), middle (2-3) and late (4).
    plot = draw_pair(llama_trace, drifted_trace, labels=("base", "drifted"))

    assert plot.marked == {"contraction": (2, 3), "transport": (4,)}
    assert len(artists_with_gid(plot, LARGEST_BAND_GID)) == 2
    assert png_size(plot.save(tmp_path / "pair.png")) == (1000, 750)


def test_pair_without_change_marks_nothing(llama_trace):
    plot = draw_pair(llama_trace, llama_trace, labels=("a", "b"))

    assert plot.marked == {"contraction": (), "transport": ()}
    assert artists_with_gid(plot, LARGEST_BAND_GID) == []


def test_missing_matplotlib_raises_hint(llama_trace, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    with pytest.raises(PlottingUnavailable) as raised:
        draw_trace(llama_trace)

    assert PLOT_INSTALL_HINT in str(raised.value)
    assert "matplotlib" in str(raised.value)
