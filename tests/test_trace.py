"""Tests of the depth-trace data model and its JSON file format."""

from __future__ import annotations

import json
import math

import pytest

from pytest_spinal.errors import TraceFileError
from pytest_spinal.trace import SCHEMA_VERSION, DepthTrace, TraceSettings, TraceSpread

# Values that binary floats cannot hold exactly, so a lossy float format would show.
CONTRACTION = (0.1, 1.0 / 3.0, 2.5, 1.7, 3.25)
TRANSPORT = (2.9, 0.7, 1.0 / 7.0, 0.35)
PER_PROMPT = ((2.8, 0.6, 0.2, 0.3), (3.0, 0.8, 1.0 / 11.0, 0.4))


def make_trace(**changes) -> DepthTrace:
    """Build a 4-layer trace of two prompts with metadata like a real one, with ``changes`` applied."""
    fields = {
        "contraction": CONTRACTION,
        "transport": TRANSPORT,
        "transport_per_prompt": PER_PROMPT,
        "settings": TraceSettings(),
        "probes": {"source": "default", "fingerprint": "sha256:ab", "prompts": 2, "tokens": 40, "chat_template": True},
        "checkpoint": {"name": "tiny", "fingerprint": "sha256:cd", "model_class": "LlamaForCausalLM", "dtype": "float32"},
        "environment": {"device": "cpu", "torch": "2.13.0", "transformers": "5.25.0"},
        "run": {"batch_size": 8, "chunk_size": 256},
    }
    fields.update(changes)
    return DepthTrace(**fields)


def edited_text(edit) -> str:
    """Return the JSON text of ``make_trace()`` after ``edit`` changed its parsed form in place."""
    data = json.loads(make_trace().dumps())
    edit(data)
    return json.dumps(data, indent=2)


# Round trip and saving


def test_json_round_trip_equal():
    trace = make_trace()

    assert DepthTrace.loads(trace.dumps()) == trace


def test_json_round_trip_text_identical():
    text = make_trace().dumps()

    assert DepthTrace.loads(text).dumps() == text


def test_save_load_round_trip(tmp_path):
    trace = make_trace()

    path = trace.save(tmp_path / "trace.json")

    assert DepthTrace.load(path) == trace


def test_save_leaves_no_temporary_file(tmp_path):
    make_trace().save(tmp_path / "trace.json")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["trace.json"]


def test_save_replaces_existing_file(tmp_path):
    target = tmp_path / "trace.json"
    target.write_text("old contents", encoding="utf-8")

    make_trace().save(target)

    assert DepthTrace.load(target) == make_trace()


def test_save_creates_parent_folders(tmp_path):
    path = make_trace().save(tmp_path / "a" / "b" / "trace.json")

    assert path.is_file()


def test_schema_version_written():
    assert json.loads(make_trace().dumps())["schema_version"] == SCHEMA_VERSION


# Non-finite values


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"contraction": (0.1, 0.2, math.nan, 0.4, 0.5)}, r"contraction\[2\]"),
        ({"transport": (2.9, 0.7, math.inf, 0.35)}, r"transport\[2\]"),
        ({"transport_per_prompt": (PER_PROMPT[0], (3.0, math.nan, 0.1, 0.4))}, r"transport_per_prompt\[1\]\[1\]"),
    ],
)
def test_non_finite_rejected_on_construction(changes, name):
    with pytest.raises(ValueError, match=name):
        make_trace(**changes)


def test_nan_rejected_on_write():
    # The profiles are checked on construction, but the metadata dictionaries are free-form.
    trace = make_trace(run={"batch_size": 8, "learning_rate": math.nan})

    with pytest.raises(TraceFileError, match="NaN or infinity"):
        trace.dumps()


def test_nan_write_leaves_no_file(tmp_path):
    trace = make_trace(run={"batch_size": 8, "learning_rate": math.inf})

    with pytest.raises(TraceFileError):
        trace.save(tmp_path / "trace.json")

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_rejected_on_read(tmp_path, constant):
    placeholder = "__value__"

    def set_placeholder(data):
        data["contraction"][1] = placeholder

    path = tmp_path / "trace.json"
    path.write_text(edited_text(set_placeholder).replace(f'"{placeholder}"', constant), encoding="utf-8")

    with pytest.raises(TraceFileError) as raised:
        DepthTrace.load(path)

    assert str(path) in str(raised.value)


@pytest.mark.parametrize("value", ["1.5", True, None])
def test_non_number_rejected_on_read(value):
    def set_value(data):
        data["contraction"][1] = value

    with pytest.raises(TraceFileError, match=r"contraction\[1\]"):
        DepthTrace.loads(edited_text(set_value))


# Schema, shapes and derived figures


def test_wrong_schema_version():
    def set_version(data):
        data["schema_version"] = SCHEMA_VERSION + 1

    with pytest.raises(TraceFileError, match=f"schema_version {SCHEMA_VERSION + 1} is not supported"):
        DepthTrace.loads(edited_text(set_version))


def test_missing_schema_version():
    def drop_version(data):
        del data["schema_version"]

    with pytest.raises(TraceFileError, match="schema_version None"):
        DepthTrace.loads(edited_text(drop_version))


def test_contraction_length_mismatch():
    def drop_value(data):
        data["contraction"].pop()

    with pytest.raises(TraceFileError, match="contraction has 4 values but needs 5"):
        DepthTrace.loads(edited_text(drop_value))


def test_per_prompt_row_length_mismatch():
    def drop_value(data):
        data["transport_per_prompt"][1].pop()

    with pytest.raises(TraceFileError, match=r"transport_per_prompt\[1\] has 3 values but needs 4"):
        DepthTrace.loads(edited_text(drop_value))


def test_num_layers_mismatch():
    def set_layers(data):
        data["num_layers"] = 5

    with pytest.raises(TraceFileError, match="num_layers is 5"):
        DepthTrace.loads(edited_text(set_layers))


def test_missing_section_rejected():
    def drop_settings(data):
        del data["settings"]

    with pytest.raises(TraceFileError, match="not a valid depth trace"):
        DepthTrace.loads(edited_text(drop_settings))


def test_hand_edited_contraction():
    def edit_late_layer(data):
        data["contraction"][4] += 0.01

    with pytest.raises(TraceFileError, match="derived figures do not match"):
        DepthTrace.loads(edited_text(edit_late_layer))


def test_hand_edited_transport():
    def edit_first_pair(data):
        data["transport"][0] -= 0.01

    with pytest.raises(TraceFileError, match="derived figures do not match"):
        DepthTrace.loads(edited_text(edit_first_pair))


def test_hand_edited_embedding_contraction():
    # Layer 0 is in no band, so only the checksum catches this edit.
    def edit_embedding_layer(data):
        data["contraction"][0] += 0.01

    with pytest.raises(TraceFileError, match="edited by hand or is corrupt"):
        DepthTrace.loads(edited_text(edit_embedding_layer))


def test_hand_edited_per_prompt_transport():
    def edit_one_prompt(data):
        data["transport_per_prompt"][1][2] += 0.01

    with pytest.raises(TraceFileError, match="edited by hand or is corrupt"):
        DepthTrace.loads(edited_text(edit_one_prompt))


def test_json_array_rejected():
    with pytest.raises(TraceFileError, match="a depth trace is a JSON object, got list"):
        DepthTrace.loads("[1, 2, 3]")


def test_truncated_file_named(tmp_path):
    path = tmp_path / "trace.json"
    text = make_trace().dumps()
    path.write_text(text[: len(text) // 2], encoding="utf-8")

    with pytest.raises(TraceFileError) as raised:
        DepthTrace.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "invalid JSON" in message


def test_missing_file_named(tmp_path):
    path = tmp_path / "absent.json"

    with pytest.raises(TraceFileError) as raised:
        DepthTrace.load(path)

    message = str(raised.value)
    assert str(path) in message
    assert "not found" in message


def test_no_layers_rejected():
    with pytest.raises(ValueError, match="at least one layer pair"):
        make_trace(contraction=(1.0,), transport=(), transport_per_prompt=())


# Derived figures


def test_num_layers():
    assert make_trace().num_layers == 4


def test_path_length():
    assert make_trace().path_length == pytest.approx(2.9 + 0.7 + 1.0 / 7.0 + 0.35, rel=1e-15)


def test_bands_of_four_layers():
    # Band bounds are round(4 * k / 3) for k = 0..3: 0, 1, 3, 4.
    trace = make_trace()

    assert trace.band_layers("early") == [1]
    assert trace.band_layers("middle") == [2, 3]
    assert trace.band_layers("late") == [4]


def test_late_band_of_thirty_layers():
    trace = make_trace(contraction=(1.0,) * 31, transport=(0.5,) * 30, transport_per_prompt=())

    assert trace.band_layers("late") == list(range(21, 31))


def test_band_means_pinned():
    means = make_trace().band_means()

    assert means["early"] == {"contraction": pytest.approx(1.0 / 3.0), "transport": pytest.approx(2.9)}
    assert means["middle"] == {"contraction": pytest.approx(2.1), "transport": pytest.approx((0.7 + 1.0 / 7.0) / 2)}
    assert means["late"] == {"contraction": pytest.approx(3.25), "transport": pytest.approx(0.35)}


def test_empty_band_mean_is_none():
    # With one layer the bounds are 0, 0, 1, 1: only the middle band contains a layer.
    trace = make_trace(contraction=(1.0, 2.0), transport=(0.5,), transport_per_prompt=((0.5,),))

    assert trace.band_means()["early"] == {"contraction": None, "transport": None}


def test_one_layer_round_trip():
    trace = make_trace(contraction=(1.0, 2.0), transport=(0.5,), transport_per_prompt=((0.5,),))

    assert DepthTrace.loads(trace.dumps()) == trace


def test_unknown_band_rejected():
    with pytest.raises(ValueError, match="'deep'"):
        make_trace().band_layers("deep")


# Settings


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"tail_window": (0.9, 0.5)}, "tail_window"),
        ({"tail_window": (-0.1, 0.5)}, "tail_window"),
        ({"tail_window": (0.5, 1.5)}, "tail_window"),
        ({"positions": "first"}, "positions"),
        ({"metric_dtype": "float16"}, "metric_dtype"),
    ],
)
def test_invalid_settings_rejected(changes, name):
    with pytest.raises(ValueError, match=name):
        TraceSettings(**changes)


def test_settings_round_trip():
    settings = TraceSettings(tail_window=(0.25, 0.75), positions="last", metric_dtype="float64")

    assert DepthTrace.loads(make_trace(settings=settings).dumps()).settings == settings


# Spread

SPREAD = TraceSpread(contraction=(0.01, 0.02, 0.03, 0.02, 0.01), transport=(0.004, 0.003, 0.002, 0.001), resamples=32, seed=0)


def test_spread_round_trip():
    trace = make_trace(spread=SPREAD)

    assert DepthTrace.loads(trace.dumps()) == trace
    assert json.loads(trace.dumps())["spread"]["method"] == "bootstrap over prompts"


def test_missing_spread_written_as_null():
    assert json.loads(make_trace().dumps())["spread"] is None


def test_edited_spread_detected():
    def edit(data):
        data["spread"]["transport"][3] = 0.5

    data = json.loads(make_trace(spread=SPREAD).dumps())
    edit(data)

    with pytest.raises(TraceFileError, match="checksum or derived figures do not match"):
        DepthTrace.from_json(data)


@pytest.mark.parametrize(
    ("spread", "message"),
    [
        (TraceSpread((0.1,), SPREAD.transport, 32, 0), "spread has 1 contraction and 4 transport values but needs 5 and 4"),
        (TraceSpread(SPREAD.contraction, (0.1, -0.1, 0.1, 0.1), 32, 0), "cannot be negative"),
        (TraceSpread(SPREAD.contraction, (0.1, math.nan, 0.1, 0.1), 32, 0), "spread.transport[1] is nan"),
    ],
    ids=["length", "negative", "nan"],
)
def test_invalid_spread_rejected(spread, message):
    with pytest.raises(ValueError) as raised:
        make_trace(spread=spread)

    assert message in str(raised.value)
