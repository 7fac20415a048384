"""Probe sets: the fixed prompts a checkpoint is traced over, and their token ids."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

from pytest_spinal.errors import ProbeError

#: Name under which the packaged probe set is recorded in traces.
DEFAULT_PROBES = "default"

ProbeSource = Union[None, str, os.PathLike, Sequence[str], "ProbeSet"]


@dataclass(frozen=True)
class ProbeSet:
    """Prompts to trace, in order, and where they came from."""

    prompts: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ProbeError(f"probe set {self.source!r} has no prompts; give at least one prompt")
        for index, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ProbeError(f"probe set {self.source!r}: prompt {index} is {prompt!r}; every prompt must be non-empty text")


@dataclass(frozen=True)
class EncodedProbes:
    """Token ids of each prompt of a probe set, as fed to the model, and their fingerprint."""

    token_ids: tuple[tuple[int, ...], ...]
    source: str
    chat_template: bool

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the token ids as a multiset; traces are comparable only when these match.

        The prompts are sorted first: contraction, transport and their spread do not depend on
        the order of the prompts, so a reordered probe set stays comparable with its baseline.
        """
        payload = json.dumps(sorted(list(ids) for ids in self.token_ids), separators=(",", ":"))
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def load_probes(source: ProbeSource = None) -> ProbeSet:
    """Load a probe set: the packaged default (``None`` or ``"default"``), a file, or a list of prompts.

    A ``.jsonl`` file contains one JSON object a line with a ``"prompt"`` key. Any other file
    contains one prompt a line, and blank lines are skipped.
    """
    if isinstance(source, ProbeSet):
        return source
    if source is None or source == DEFAULT_PROBES:
        text = resources.files("pytest_spinal").joinpath("data/default_probes.jsonl").read_text(encoding="utf-8")
        return ProbeSet(prompts=_parse_jsonl(text, DEFAULT_PROBES), source=DEFAULT_PROBES)
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source))
    return ProbeSet(prompts=tuple(source), source="<list>")


def encode_probes(tokenizer: Any, probes: ProbeSet, *, chat_template: bool = True) -> EncodedProbes:
    """Tokenise each prompt, wrapped as a user turn in the tokenizer's chat template when it has one.

    With ``chat_template=False``, or for a tokenizer without a template, the plain prompt is
    tokenised with the tokenizer's own special tokens.
    """
    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoded = []
    for prompt in probes.prompts:
        if use_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        encoded.append(tuple(int(token) for token in ids))

    return EncodedProbes(token_ids=tuple(encoded), source=probes.source, chat_template=use_template)


def _load_file(path: Path) -> ProbeSet:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbeError(f"probe file {str(path)!r} not found; pass a .jsonl file or a text file with one prompt a line") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ProbeError(f"probe file {str(path)!r} could not be read as UTF-8 text: {error}") from error

    if path.suffix == ".jsonl":
        return ProbeSet(prompts=_parse_jsonl(text, str(path)), source=str(path))
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    return ProbeSet(prompts=prompts, source=str(path))


def _parse_jsonl(text: str, source: str) -> tuple[str, ...]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ProbeError(f"probe file {source!r}, line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ProbeError(
                f"probe file {source!r}, line {number}: expected an object with a \"prompt\" string, got {line.strip()[:80]!r}"
            )
        prompts.append(record["prompt"])
    return tuple(prompts)
