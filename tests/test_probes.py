"""Tests of probe-set loading, tokenisation with and without a chat template, and fingerprints."""

from __future__ import annotations

import json

import pytest

from pytest_spinal.errors import ProbeError
from pytest_spinal.probes import ProbeSet, encode_probes, load_probes

ROLE_TOKENS = ("<|user|>", "<|assistant|>")


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


# Loading


def test_default_set_size():
    assert len(load_probes().prompts) >= 48


def test_default_set_by_name():
    assert load_probes("default") == load_probes()


def test_default_set_source():
    assert load_probes().source == "default"


def test_default_prompts_unique():
    prompts = load_probes().prompts

    assert len(set(prompts)) == len(prompts)


def test_text_file_skips_blank_lines(tmp_path):
    path = tmp_path / "probes.txt"
    path.write_text("First prompt.\n\n   \n  Second prompt.  \n\n", encoding="utf-8")

    probes = load_probes(path)

    assert probes.prompts == ("First prompt.", "Second prompt.")
    assert probes.source == str(path)


def test_jsonl_file(tmp_path):
    path = tmp_path / "probes.jsonl"
    write_jsonl(path, [{"id": "a", "prompt": "Alpha?"}, {"prompt": "Beta."}])

    assert load_probes(path).prompts == ("Alpha?", "Beta.")


def test_jsonl_blank_lines_skipped(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text('{"prompt": "Alpha?"}\n\n{"prompt": "Beta."}\n', encoding="utf-8")

    assert load_probes(path).prompts == ("Alpha?", "Beta.")


def test_jsonl_invalid_line_number(tmp_path):
    path = tmp_path / "probes.jsonl"
    # Line 3 is the broken one; the blank line 2 still counts.
    path.write_text('{"prompt": "Alpha?"}\n\n{"prompt": "Beta.",\n', encoding="utf-8")

    with pytest.raises(ProbeError) as raised:
        load_probes(path)

    message = str(raised.value)
    assert "line 3" in message
    assert "invalid JSON" in message


def test_jsonl_missing_prompt_key(tmp_path):
    path = tmp_path / "probes.jsonl"
    write_jsonl(path, [{"prompt": "Alpha?"}, {"text": "Beta."}])

    with pytest.raises(ProbeError) as raised:
        load_probes(path)

    message = str(raised.value)
    assert "line 2" in message
    assert '"prompt"' in message


def test_jsonl_prompt_not_string(tmp_path):
    path = tmp_path / "probes.jsonl"
    write_jsonl(path, [{"prompt": 42}])

    with pytest.raises(ProbeError, match="line 1"):
        load_probes(path)


@pytest.mark.parametrize("name", ["probes.txt", "probes.jsonl"])
def test_empty_file_rejected(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n  \n", encoding="utf-8")

    with pytest.raises(ProbeError, match="no prompts"):
        load_probes(path)


def test_missing_file_named(tmp_path):
    path = tmp_path / "absent.jsonl"

    with pytest.raises(ProbeError) as raised:
        load_probes(path)

    message = str(raised.value)
    assert str(path) in message
    assert "not found" in message


def test_non_utf8_file_rejected(tmp_path):
    path = tmp_path / "probes.txt"
    path.write_bytes(b"caf\xe9 au lait\n")

    with pytest.raises(ProbeError, match="UTF-8"):
        load_probes(path)


def test_prompt_list():
    probes = load_probes(["One.", "Two."])

    assert probes.prompts == ("One.", "Two.")
    assert probes.source == "<list>"


def test_blank_prompt_in_list_rejected():
    with pytest.raises(ProbeError, match="prompt 1"):
        load_probes(["One.", "   "])


def test_probe_set_passes_through():
    probes = ProbeSet(prompts=("One.",), source="mine")

    assert load_probes(probes) is probes


# Tokenisation


def test_chat_template_applied_llama(tiny_model):
    _, tokenizer = tiny_model("llama")

    encoded = encode_probes(tokenizer, load_probes(["Where is the ferry?"]))
    ids = encoded.token_ids[0]

    assert encoded.chat_template is True
    for token in ROLE_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) in ids


def test_chat_template_single_bos(tiny_model):
    # The template writes <s> itself, so the tokenizer must not add a second one.
    _, tokenizer = tiny_model("llama")

    ids = encode_probes(tokenizer, load_probes(["Where is the ferry?"])).token_ids[0]

    assert ids[0] == tokenizer.bos_token_id
    assert ids[1] != tokenizer.bos_token_id


def test_no_chat_template_gpt2(tiny_model):
    _, tokenizer = tiny_model("gpt2")
    prompt = "Where is the ferry?"

    encoded = encode_probes(tokenizer, load_probes([prompt]))

    assert encoded.chat_template is False
    assert encoded.token_ids[0] == tuple(tokenizer(prompt)["input_ids"])


def test_chat_template_disabled(tiny_model):
    _, tokenizer = tiny_model("llama")
    prompt = "Where is the ferry?"

    encoded = encode_probes(tokenizer, load_probes([prompt]), chat_template=False)

    assert encoded.chat_template is False
    assert encoded.token_ids[0] == tuple(tokenizer(prompt)["input_ids"])


def test_num_tokens_sums_prompts(tiny_model):
    _, tokenizer = tiny_model("gpt2")
    prompts = ["Where is the ferry?", "Bake the loaf for 35 minutes."]

    encoded = encode_probes(tokenizer, load_probes(prompts))

    assert encoded.num_tokens == sum(len(tokenizer(prompt)["input_ids"]) for prompt in prompts)


# Fingerprints


def test_fingerprint_stable(tiny_model):
    _, tokenizer = tiny_model("llama")

    first = encode_probes(tokenizer, load_probes())
    second = encode_probes(tokenizer, load_probes())

    assert first.fingerprint == second.fingerprint
    assert first.fingerprint.startswith("sha256:")


def test_fingerprint_changes_with_prompt(tiny_model):
    _, tokenizer = tiny_model("llama")
    prompts = list(load_probes().prompts)
    edited = [*prompts[:-1], prompts[-1] + " Please."]

    original = encode_probes(tokenizer, load_probes(prompts))
    changed = encode_probes(tokenizer, load_probes(edited))

    assert changed.fingerprint != original.fingerprint


def test_fingerprint_ignores_order(tiny_model):
    # The metrics do not depend on prompt order, so reordering keeps a baseline comparable.
    _, tokenizer = tiny_model("llama")
    prompts = list(load_probes().prompts)

    original = encode_probes(tokenizer, load_probes(prompts))
    reordered = encode_probes(tokenizer, load_probes([*reversed(prompts)]))

    assert reordered.fingerprint == original.fingerprint


def test_fingerprint_counts_repeated_prompts(tiny_model):
    _, tokenizer = tiny_model("llama")
    prompts = list(load_probes().prompts)

    original = encode_probes(tokenizer, load_probes(prompts))
    repeated = encode_probes(tokenizer, load_probes([*prompts, prompts[0]]))

    assert repeated.fingerprint != original.fingerprint


def test_fingerprint_changes_with_template(tiny_model):
    _, tokenizer = tiny_model("llama")

    with_template = encode_probes(tokenizer, load_probes())
    without_template = encode_probes(tokenizer, load_probes(), chat_template=False)

    assert with_template.fingerprint != without_template.fingerprint
