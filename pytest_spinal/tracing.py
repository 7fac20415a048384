"""Trace a checkpoint over a probe set into a :class:`DepthTrace`.

One forward pass per batch returns every layer's hidden states. Contraction needs the spectrum of
all real-token states of a layer. Where the spread is measured, or where N x d float32 states take
less memory than a d x d float64 Gram matrix, those states are kept. Otherwise each layer's Gram
matrix is summed batch by batch and the states are dropped. Transport streams: real-token
positions queue up across batches into chunks of ``chunk_size``, and for each chunk the logit
lens runs layer by layer in two buffers. They contain the previous and the current layer's
square-root probabilities, each row times a factor (two chunks of vocabulary-sized rows), and are
freed during forward passes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from pytest_spinal import __version__
from pytest_spinal.architectures import LogitLens, resolve_lens
from pytest_spinal.checkpoints import CheckpointSource, LoadedCheckpoint, dispatched_devices, load_checkpoint
from pytest_spinal.errors import TraceError
from pytest_spinal.metrics import contraction, fisher_rao_from_scaled_roots, singular_values_from_gram, tail_exponent
from pytest_spinal.probes import EncodedProbes, ProbeSource, encode_probes, load_probes
from pytest_spinal.trace import DepthTrace, TraceSettings, TraceSpread

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_CHUNK_SIZE = 256

#: Bootstrap resamples of the prompts behind a trace's spread, and the seed that draws them.
SPREAD_RESAMPLES = 32
SPREAD_SEED = 0

#: Minimum number of prompts for a spread, because resamples of fewer repeat the same few prompts.
MIN_SPREAD_PROMPTS = 8

#: Rows of float32 states converted to float64 at a time for a Gram matrix.
_GRAM_BLOCK_ROWS = 256

#: Largest size of the per-prompt Gram matrices kept at once while resampling one layer.
_PROMPT_GRAMS_MAX_BYTES = 1 << 30


class _GramSums:
    """Each layer's Gram matrix ``X.T @ X`` in float64, summed batch by batch, two layers to a matrix.

    A Gram matrix is symmetric, so layer ``2k`` keeps its upper triangle and layer ``2k + 1`` its
    strict lower triangle in the same d x d matrix, and the odd layer's diagonal apart: half the
    memory of one matrix per layer. On a 7B model (d = 4096, 33 hidden states) that is 2.1 GiB rather
    than 4.1 GiB. :meth:`gram` rebuilds one layer's matrix for its spectrum.
    """

    def __init__(self, layers: int) -> None:
        self.pairs: list[Any] = [None] * _pair_count(layers)
        self.diagonals: list[Any] = [None] * len(self.pairs)
        # Per device: a block of float64 rows and a d x d product, reused for every batch and layer
        # so that the sums allocate nothing per batch (temporaries of a new size in every batch
        # would fragment the C heap).
        self.scratch: dict[Any, tuple[Any, Any]] = {}

    def add(self, layer: int, states: Any) -> None:
        import torch

        width = states.shape[-1]
        index = layer // 2
        if self.pairs[index] is None:
            self.pairs[index] = torch.zeros((width, width), dtype=torch.float64, device=states.device)
            self.diagonals[index] = torch.zeros(width, dtype=torch.float64, device=states.device)
        if states.device not in self.scratch:
            self.scratch[states.device] = (
                torch.empty((_GRAM_BLOCK_ROWS, width), dtype=torch.float64, device=states.device),
                torch.empty((width, width), dtype=torch.float64, device=states.device),
            )
        rows, product = self.scratch[states.device]
        product.zero_()
        for begin in range(0, states.shape[0], _GRAM_BLOCK_ROWS):
            block = states[begin : begin + _GRAM_BLOCK_ROWS]
            wide = rows[: block.shape[0]].copy_(block)
            product.addmm_(wide.T, wide)
        # With a device map, the two layers of a pair can sit on different devices.
        product = product.to(self.pairs[index].device)
        if layer % 2 == 0:
            self.pairs[index].add_(product.triu_())
        else:
            self.diagonals[index].add_(product.diagonal())
            self.pairs[index].add_(product.tril_(-1))

    @staticmethod
    def nbytes(layers: int, width: int) -> int:
        """Return the memory of the sums for ``layers`` layers of ``width`` features: a d x d matrix and a diagonal per pair."""
        return _pair_count(layers) * (width * width + width) * 8

    def gram(self, layer: int) -> tuple[Any, str]:
        """Return a matrix containing ``layer``'s Gram matrix in one triangle, and which triangle (``"U"`` or ``"L"``)."""
        pair = self.pairs[layer // 2]
        if layer % 2 == 0:
            return pair, "U"
        lower = pair.clone()
        lower.diagonal().copy_(self.diagonals[layer // 2])
        return lower, "L"


def _pair_count(layers: int) -> int:
    return (layers + 1) // 2


@dataclass
class _Accumulator:
    """Per-layer real-token states (or their Gram matrices) and per-token transport, gathered batch by batch.

    With ``keep_states`` each layer's states are kept (float32), else ``grams`` sums
    ``states.T @ states`` in float64 and ``rows`` counts the states.
    """

    keep_states: bool
    states: list[list[Any]]
    grams: _GramSums
    distances: list[list[Any]]
    rows: int = 0
    hidden_size: int = 0

    def add_states(self, layer: int, real: Any) -> None:
        import torch

        if layer == 0:
            self.rows += real.shape[0]
            self.hidden_size = real.shape[-1]
        if self.keep_states:
            self.states[layer].append(real.to(torch.float32))
        else:
            self.grams.add(layer, real)


@dataclass
class _LensQueue:
    """Each layer's lens inputs (real-token states) waiting for a full chunk, in probe order.

    Positions carry over from one batch to the next, so every lens product but the last has
    exactly ``chunk_size`` rows. A batch of 8 prompts contains about 400 positions, and cutting it
    alone would leave chunks of about 200 rows, whose products ran about 9% slower per row than
    256 on a 2-core CPU.
    A chunk is a list with one entry per layer: the parts of that layer's rows, views into the
    batches they come from (two parts where a chunk spans two batches). The rows left over after a
    batch's chunks are copied with ``compact``, so the rest of that batch's states can be freed
    before the next forward pass (without it, where the accumulator keeps the states anyway).
    """

    chunk_size: int
    compact: bool = True
    pieces: list[list[Any]] = field(default_factory=list)
    rows: int = 0

    def push(self, inputs: list[Any]) -> list[list[list[Any]]]:
        """Queue one batch's inputs (one tensor per layer) and return every full chunk."""
        self.pieces.append(inputs)
        self.rows += inputs[0].shape[0]
        chunks = [self._take(self.chunk_size) for _ in range(self.rows // self.chunk_size)]
        if self.compact:
            self.pieces = [[_compact(layer) for layer in piece] for piece in self.pieces]
        return chunks

    def rest(self) -> list[list[list[Any]]]:
        """Return the last, shorter chunk, if any positions are left."""
        return [self._take(self.rows)] if self.rows else []

    def _take(self, rows: int) -> list[list[Any]]:
        parts: list[list[Any]] = []
        while rows:
            piece = self.pieces[0]
            available = piece[0].shape[0]
            if available <= rows:
                parts.append(self.pieces.pop(0))
            else:
                parts.append([layer[:rows] for layer in piece])
                self.pieces[0] = [layer[rows:] for layer in piece]
            count = min(available, rows)
            rows -= count
            self.rows -= count
        return [list(layer_parts) for layer_parts in zip(*parts)]


def _compact(rows: Any) -> Any:
    """Return ``rows``, copied where it views a larger tensor, so that the rest of that tensor can be freed."""
    return rows.clone() if rows.untyped_storage().nbytes() > rows.numel() * rows.element_size() else rows


def trace_checkpoint(
    checkpoint: CheckpointSource,
    *,
    probes: ProbeSource = None,
    settings: TraceSettings | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chat_template: bool = True,
    spread: bool = True,
    device_map: str | None = None,
) -> DepthTrace:
    """Load ``checkpoint`` and trace it over ``probes`` (the packaged default set when ``None``).

    ``batch_size`` prompts share a forward pass and ``chunk_size`` positions share one logit-lens
    product; neither changes the result beyond float rounding. ``spread`` adds the probe set's
    measured noise (:class:`TraceSpread`), which a baseline needs for ``auto`` tolerances; a
    trace that is only compared with a baseline can skip it. ``device_map="auto"`` spreads a model
    too large for one GPU over several. See :func:`load_checkpoint` for the accepted checkpoints
    and device maps, and :func:`load_probes` for probe sets.
    """
    loaded = load_checkpoint(checkpoint, device=device, dtype=dtype, device_map=device_map)
    encoded = encode_probes(loaded.tokenizer, load_probes(probes), chat_template=chat_template)
    return trace_loaded(
        loaded, encoded, settings=settings or TraceSettings(), batch_size=batch_size, chunk_size=chunk_size, spread=spread
    )


def trace_loaded(
    loaded: LoadedCheckpoint,
    encoded: EncodedProbes,
    *,
    settings: TraceSettings,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    spread: bool = True,
) -> DepthTrace:
    """Trace an already loaded checkpoint over already tokenised probes."""
    import torch

    if batch_size < 1 or chunk_size < 1:
        raise TraceError(f"batch_size ({batch_size}) and chunk_size ({chunk_size}) must both be at least 1")

    model = loaded.model
    lens = resolve_lens(model)
    # With a device map, the embeddings' device takes the input and each layer stays where it is.
    device = model.get_input_embeddings().weight.device
    metric_dtype = getattr(torch, settings.metric_dtype)
    # A d x d float64 Gram matrix is smaller than N x d float32 states once N exceeds 2 d.
    positions = encoded.num_tokens if settings.positions == "all" else len(encoded.token_ids)
    hidden_size = model.get_input_embeddings().weight.shape[-1]
    accumulator = _Accumulator(
        keep_states=spread or positions <= 2 * hidden_size,
        states=[[] for _ in range(lens.num_layers + 1)],
        grams=_GramSums(lens.num_layers + 1),
        distances=[[] for _ in range(lens.num_layers)],
    )

    logger.info(
        "tracing %s: %d prompts, %d tokens, %d layers, batches of %d on %s",
        loaded.name, len(encoded.token_ids), encoded.num_tokens, lens.num_layers, batch_size, device,
    )
    prompt_tokens = []
    with torch.inference_mode(), _full_float32_matmul():
        queue = _LensQueue(chunk_size, compact=not accumulator.keep_states)
        buffer_rows = min(chunk_size, positions)
        for start in range(0, len(encoded.token_ids), batch_size):
            batch = encoded.token_ids[start : start + batch_size]
            counts, inputs = _run_batch(lens, batch, device=device, settings=settings, accumulator=accumulator, first_prompt=start)
            prompt_tokens.extend(counts)
            _return_freed_heap()
            chunks = queue.push(inputs)
            # The queue and the chunks contain what the lens still needs. Dropping this reference lets
            # the rest of the batch's states be freed once its chunks are done.
            del inputs
            _lens_chunks(lens, chunks, rows=buffer_rows, metric_dtype=metric_dtype, distances=accumulator.distances)
            del chunks
            logger.info("traced prompts %d-%d of %d", start + 1, start + len(batch), len(encoded.token_ids))
        _lens_chunks(lens, queue.rest(), rows=buffer_rows, metric_dtype=metric_dtype, distances=accumulator.distances)

        contraction_profile = _contraction_profile(accumulator, settings)
        per_token = _per_token_transport(accumulator.distances)
        transport, per_prompt = _transport_profile(per_token, prompt_tokens)
        measured_spread = _spread(accumulator, per_token, prompt_tokens, settings) if spread else None

    return DepthTrace(
        contraction=contraction_profile,
        transport=transport,
        transport_per_prompt=per_prompt,
        settings=settings,
        probes={
            "source": encoded.source,
            "fingerprint": encoded.fingerprint,
            "prompts": len(encoded.token_ids),
            "tokens": encoded.num_tokens,
            "positions_traced": sum(prompt_tokens),
            "chat_template": encoded.chat_template,
        },
        checkpoint={
            "name": loaded.name,
            "fingerprint": loaded.fingerprint,
            "model_class": type(model).__name__,
            "model_type": model.config.model_type,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "hidden_size": int(accumulator.hidden_size),
        },
        environment=_environment(device, dispatched_devices(model)),
        run={"batch_size": batch_size, "chunk_size": chunk_size},
        spread=measured_spread,
    )


def _run_batch(
    lens: LogitLens,
    batch: tuple[tuple[int, ...], ...],
    *,
    device: Any,
    settings: TraceSettings,
    accumulator: _Accumulator,
    first_prompt: int,
) -> tuple[list[int], list[Any]]:
    """Run one left-padded batch and add its real-token states to ``accumulator``.

    Returns the number of positions traced per prompt, and the lens's input for each layer 0..L:
    the real-token states of layers 0..L-1, then the final-normalised states of layer L.
    """
    import torch

    input_ids, attention_mask = _left_pad(batch, device=device)

    # Positions count real tokens only, so a left-padded prompt sees the positions it has alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    output = lens.decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        use_cache=False,
        return_dict=True,
    )
    hidden_states = output.hidden_states
    if len(hidden_states) != lens.num_layers + 1:
        raise TraceError(f"the model returned {len(hidden_states)} hidden states for {lens.num_layers} layers; expected {lens.num_layers + 1}")

    selected = attention_mask.bool()
    if settings.positions == "last":
        selected = torch.zeros_like(selected)
        selected[:, -1] = True
    counts = selected.sum(dim=1).tolist()

    inputs = []
    for layer, states in enumerate(hidden_states):
        real = states[selected.to(states.device)]
        _check_finite(real, layer=layer, first_prompt=first_prompt, counts=counts)
        accumulator.add_states(layer, real)
        inputs.append(real)

    # The decoder's last_hidden_state went through the final norm: it is what the head sees.
    inputs[-1] = output.last_hidden_state[selected.to(output.last_hidden_state.device)]
    return counts, inputs


def _lens_chunks(lens: LogitLens, chunks: list[list[list[Any]]], *, rows: int, metric_dtype: Any, distances: list[list[Any]]) -> None:
    """Run the lens over ``chunks`` of positions, layer by layer, and append each layer pair's distances.

    The chunks' vocabulary-sized rows live in two buffers of ``rows`` rows, allocated here and freed
    on return, so that they do not sit idle through the next forward pass. They take turns: one
    contains the previous layer's roots and the other receives the current layer's, then the
    distance overwrites the previous one, which is reused next.
    """
    import torch

    if not chunks:
        return
    buffers = [lens.roots_buffer(rows, metric_dtype) for _ in range(2)]
    for chunk in chunks:
        size = sum(part.shape[0] for part in chunk[0])
        previous, previous_norms = lens.scaled_root_probs(
            _joined(chunk[0]), normalised=False, dtype=metric_dtype, out=_rows_of(buffers[0], size)
        )
        for layer in range(1, lens.num_layers + 1):
            final = layer == lens.num_layers
            current, current_norms = lens.scaled_root_probs(
                _joined(chunk[layer]), normalised=final, dtype=metric_dtype, out=_rows_of(buffers[layer % 2], size)
            )
            distance = fisher_rao_from_scaled_roots(previous, previous_norms, current, current_norms)
            distances[layer - 1].append(distance.to(torch.float64))
            previous, previous_norms = current, current_norms


def _joined(parts: list[Any]) -> Any:
    """Return one layer's rows of a chunk as one tensor, copying only where the chunk spans two batches."""
    import torch

    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rows_of(buffer: Any, rows: int) -> Any:
    return None if buffer is None else buffer[:rows]


@functools.cache
def _malloc_trim() -> Any:
    """Return glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, musl, Windows)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_heap() -> None:
    """Hand the C heap's free pages back to the system, where glibc allows it.

    glibc keeps the memory that a forward pass frees resident inside its heap (50 to 120 MiB for
    SmolLM2-135M in batches of 8 prompts, measured with ``mallinfo2``). Without this the trace's
    resident memory crept up batch by batch. The next forward pass faults the pages in again.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """Turn TF32 off for CUDA float32 matrix products while tracing, then restore the setting.

    TF32 keeps 10 bits of mantissa, which would move float32 lens products and so the transport
    of nearly equal layers by far more than float32 rounding. bfloat16 and float16 models are
    unaffected, and the float64 spectra never use TF32.
    """
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _left_pad(batch: tuple[tuple[int, ...], ...], *, device: Any) -> tuple[Any, Any]:
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if not ids:
            raise TraceError(f"prompt {row} of a batch tokenised to no tokens; remove it from the probe set")
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _check_finite(states: Any, *, layer: int, first_prompt: int, counts: list[int]) -> None:
    import torch

    finite = torch.isfinite(states).all(dim=-1)
    if bool(finite.all()):
        return

    bad_row = int((~finite).nonzero()[0, 0])
    prompt = first_prompt
    for count in counts:
        if bad_row < count:
            break
        bad_row -= count
        prompt += 1
    raise TraceError(
        f"hidden states of layer {layer} contain NaN or infinity (first at prompt {prompt}); "
        f"in float16 this is usually an overflow: trace with dtype bfloat16 or float32"
    )


def _contraction_profile(accumulator: _Accumulator, settings: TraceSettings) -> tuple[float, ...]:
    import torch

    profile = []
    for layer in range(len(accumulator.states)):
        try:
            if accumulator.keep_states:
                profile.append(contraction(torch.cat(accumulator.states[layer]), window=settings.tail_window))
            else:
                gram, triangle = accumulator.grams.gram(layer)
                values = singular_values_from_gram(gram, triangle=triangle)
                shape = (accumulator.rows, accumulator.hidden_size)
                profile.append(tail_exponent(values, window=settings.tail_window, shape=shape))
        except TraceError as error:
            raise TraceError(f"layer {layer}: {error}") from None
    return tuple(profile)


def _per_token_transport(distances: list[list[Any]]) -> Any:
    """Stack the distances into one CPU tensor: a row per traced position in probe order, a column per layer pair."""
    import torch

    per_token = torch.stack([torch.cat(chunks) for chunks in distances], dim=1).cpu()
    if not torch.isfinite(per_token).all():
        raise TraceError("the logit lens produced a non-finite transport distance; trace in float32 or metric_dtype float64")
    return per_token


def _transport_profile(per_token: Any, prompt_tokens: list[int]) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    import torch

    per_prompt = [rows.mean(dim=0) for rows in torch.split(per_token, prompt_tokens)]
    overall = per_token.mean(dim=0)
    return tuple(overall.tolist()), tuple(tuple(row.tolist()) for row in per_prompt)


def _spread(accumulator: _Accumulator, per_token: Any, prompt_tokens: list[int], settings: TraceSettings) -> TraceSpread | None:
    """Measure each layer's spread over bootstrap resamples of the prompts (see :class:`TraceSpread`).

    Returns ``None``, with a warning, when the probe set has too few prompts or a resample's
    states span too few directions for a contraction fit.
    """
    import torch

    prompts = len(prompt_tokens)
    if prompts < MIN_SPREAD_PROMPTS:
        logger.warning(
            "no spread measured: the probe set has %d prompts and resampling needs at least %d; "
            "auto tolerances will use their fixed part only", prompts, MIN_SPREAD_PROMPTS,
        )
        return None

    logger.info("measuring the spread over %d resamples of %d prompts", SPREAD_RESAMPLES, prompts)
    generator = torch.Generator().manual_seed(SPREAD_SEED)
    drawn = torch.randint(prompts, (SPREAD_RESAMPLES, prompts), generator=generator)
    # weights[b, p]: how often resample b drew prompt p
    weights = torch.zeros(SPREAD_RESAMPLES, prompts, dtype=torch.float64)
    weights.scatter_add_(1, drawn, torch.ones_like(weights))
    tokens = torch.tensor(prompt_tokens, dtype=torch.float64)

    contraction_spread = []
    for layer, chunks in enumerate(accumulator.states):
        try:
            values = resampled_contractions(torch.cat(chunks), prompt_tokens, weights, settings)
        except TraceError as error:
            logger.warning("no spread measured: layer %d, %s; auto tolerances will use their fixed part only", layer, error)
            return None
        contraction_spread.append(float(torch.tensor(values, dtype=torch.float64).std()))

    prompt_sums = torch.stack([rows.sum(dim=0) for rows in torch.split(per_token, prompt_tokens)])
    resampled_transport = (weights @ prompt_sums) / (weights @ tokens)[:, None]
    transport_spread = resampled_transport.std(dim=0)
    return TraceSpread(
        contraction=tuple(contraction_spread),
        transport=tuple(transport_spread.tolist()),
        resamples=SPREAD_RESAMPLES,
        seed=SPREAD_SEED,
    )


def resampled_contractions(states: Any, prompt_tokens: list[int], weights: Any, settings: TraceSettings) -> list[float]:
    """Return one layer's contraction for each resample of the prompts.

    ``states`` are the layer's real-token states (N x d) in prompt order, ``prompt_tokens`` the
    rows per prompt, and ``weights[b, p]`` how often resample b drew prompt p. A resample's Gram matrix is the weighted sum of the prompts' own Gram matrices, which equals
    the Gram matrix of the drawn prompts' states stacked with repeats. Its eigenvalues give the
    resample's singular values as in :func:`~pytest_spinal.metrics.singular_values`.
    """
    import torch

    states = states.to(torch.float64)
    width = states.shape[1]
    per_prompt = torch.split(states, prompt_tokens)
    if len(per_prompt) * width * width * 8 <= _PROMPT_GRAMS_MAX_BYTES:
        prompt_grams = torch.stack([rows.T @ rows for rows in per_prompt])
        grams = torch.einsum("bp,pij->bij", weights.to(states.device), prompt_grams)
        del prompt_grams
    else:
        # NOTE: for wide models the per-prompt Gram matrices would not fit; this path costs one
        # full Gram product per resample instead.
        row_weights = weights.to(states.device).repeat_interleave(torch.tensor(prompt_tokens, device=states.device), dim=1)
        grams = torch.stack([(states * row[:, None]).T @ states for row in row_weights])

    token_counts = weights @ torch.tensor(prompt_tokens, dtype=torch.float64)
    values = []
    for resample, singular in enumerate(singular_values_from_gram(grams).cpu()):
        shape = (int(token_counts[resample]), width)
        try:
            values.append(tail_exponent(singular, window=settings.tail_window, shape=shape))
        except TraceError as error:
            raise TraceError(f"resample {resample}: {error}") from None
    return values


def _environment(device: Any, dispatched: list[str]) -> dict[str, Any]:
    import torch
    import transformers

    environment = {
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "pytest_spinal": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if dispatched:
        environment["device_map"] = dispatched
    return environment
