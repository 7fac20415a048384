"""Tests of tracing real tiny models: batching, chunking, determinism, errors and metadata."""

from __future__ import annotations

import functools
import math
import platform
import weakref

import pytest
import torch
import transformers

import pytest_spinal
from pytest_spinal.architectures import LogitLens, resolve_lens
from pytest_spinal.checkpoints import load_checkpoint
from pytest_spinal.errors import TraceError
from pytest_spinal.metrics import contraction, fisher_rao, singular_values_from_gram
from pytest_spinal.probes import encode_probes, load_probes
from pytest_spinal.trace import SCHEMA_VERSION, TraceSettings
from pytest_spinal.tracing import trace_checkpoint

from tiny_models import TINY_FAMILIES, load_tiny_model, tiny_model_path

NUM_LAYERS = 4
DEFAULT_PROMPTS = len(load_probes().prompts)


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def assert_traces_close(actual, expected, *, atol: float) -> None:
    """Assert that contraction, transport and per-prompt transport agree within ``atol``."""
    torch.testing.assert_close(as_tensor(actual.contraction), as_tensor(expected.contraction), rtol=0.0, atol=atol)
    torch.testing.assert_close(as_tensor(actual.transport), as_tensor(expected.transport), rtol=0.0, atol=atol)
    torch.testing.assert_close(
        as_tensor(actual.transport_per_prompt), as_tensor(expected.transport_per_prompt), rtol=0.0, atol=atol
    )


@pytest.fixture(scope="module")
def default_trace(tiny_model):
    """Return a function that maps a family to its trace over the default probes, computed once."""

    @functools.cache
    def trace(family: str):
        return trace_checkpoint(tiny_model(family), device="cpu")

    return trace


# Batching, chunking and determinism


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("batch_size", [8, DEFAULT_PROMPTS])
def test_padded_batch_matches_single(family, batch_size, tiny_model):
    single = trace_checkpoint(tiny_model(family), device="cpu", batch_size=1)
    batched = trace_checkpoint(tiny_model(family), device="cpu", batch_size=batch_size)

    assert_traces_close(batched, single, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_small_chunks_match_default(family, tiny_model, default_trace):
    chunked = trace_checkpoint(tiny_model(family), device="cpu", chunk_size=7)

    assert_traces_close(chunked, default_trace(family), atol=1e-6)


def test_trace_twice_identical():
    first = trace_checkpoint(tiny_model_path("gpt2"), device="cpu")
    second = trace_checkpoint(tiny_model_path("gpt2"), device="cpu")

    assert first.dumps() == second.dumps()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trace_matches_direct_computation(family, tiny_model):
    # One unpadded prompt of more than 18 tokens, run through the model's own forward pass.
    model, tokenizer = tiny_model(family)
    prompt = max(load_probes().prompts, key=len)
    token_ids = encode_probes(tokenizer, load_probes([prompt])).token_ids[0]
    with torch.no_grad():
        output = model(torch.tensor([token_ids]), output_hidden_states=True)
    lens = resolve_lens(model)
    log_probs = [lens.log_probs(states[0], normalised=False) for states in output.hidden_states[:-1]]
    log_probs.append(torch.log_softmax(output.logits[0].float(), dim=-1))

    trace = trace_checkpoint((model, tokenizer), probes=[prompt], device="cpu")

    expected_contraction = [contraction(states[0]) for states in output.hidden_states]
    expected_transport = [fisher_rao(log_probs[layer], log_probs[layer + 1]).mean().item() for layer in range(NUM_LAYERS)]
    torch.testing.assert_close(as_tensor(trace.contraction), as_tensor(expected_contraction), rtol=0.0, atol=1e-6)
    torch.testing.assert_close(as_tensor(trace.transport), as_tensor(expected_transport), rtol=0.0, atol=1e-5)


def test_overall_transport_weights_tokens(tiny_model, default_trace):
    # Each prompt's mean counts with its number of real tokens in the overall mean.
    _, tokenizer = tiny_model("llama")
    counts = as_tensor([len(ids) for ids in encode_probes(tokenizer, load_probes()).token_ids])
    trace = default_trace("llama")

    weighted = (counts[:, None] * as_tensor(trace.transport_per_prompt)).sum(dim=0) / counts.sum()

    torch.testing.assert_close(weighted, as_tensor(trace.transport), rtol=0.0, atol=1e-9)


def test_float64_metrics_match_float32(tiny_model, default_trace):
    precise = trace_checkpoint(tiny_model("llama"), device="cpu", settings=TraceSettings(metric_dtype="float64"))

    assert_traces_close(precise, default_trace("llama"), atol=1e-5)


def test_bfloat16_trace_close_to_float32():
    prompts = load_probes().prompts[:6]
    reference = trace_checkpoint(tiny_model_path("llama"), probes=prompts, device="cpu", batch_size=6)

    trace = trace_checkpoint(tiny_model_path("llama"), probes=prompts, device="cpu", dtype="bfloat16", batch_size=6)

    assert trace.checkpoint["dtype"] == "bfloat16"
    assert all(isinstance(value, float) and math.isfinite(value) for value in trace.contraction + trace.transport)
    # bfloat16 keeps 8 significant bits, so every weight and activation is rounded by up to
    # about 0.4%. Through 4 layers that moves these figures by a few thousandths.
    assert_traces_close(trace, reference, atol=0.02)


# Shapes, ranges and metadata


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trace_shapes(family, default_trace):
    trace = default_trace(family)

    assert len(trace.contraction) == NUM_LAYERS + 1
    assert len(trace.transport) == NUM_LAYERS
    assert len(trace.transport_per_prompt) == DEFAULT_PROMPTS
    assert {len(row) for row in trace.transport_per_prompt} == {NUM_LAYERS}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_transport_within_zero_and_pi(family, default_trace):
    trace = default_trace(family)
    values = [*trace.transport, *(value for row in trace.transport_per_prompt for value in row)]

    assert min(values) >= 0.0
    assert max(values) <= math.pi


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_contraction_positive(family, default_trace):
    assert min(default_trace(family).contraction) > 0.0


def test_probe_metadata(tiny_model, default_trace):
    _, tokenizer = tiny_model("llama")
    encoded = encode_probes(tokenizer, load_probes())

    probes = default_trace("llama").probes

    assert probes["source"] == "default"
    assert probes["fingerprint"] == encoded.fingerprint
    assert probes["prompts"] == DEFAULT_PROMPTS
    assert probes["tokens"] == encoded.num_tokens
    assert probes["positions_traced"] == encoded.num_tokens
    assert probes["chat_template"] is True


def test_checkpoint_metadata():
    folder = tiny_model_path("llama")

    checkpoint = trace_checkpoint(folder, device="cpu").checkpoint

    assert checkpoint["name"] == str(folder)
    assert checkpoint["fingerprint"] == load_checkpoint(folder, device="cpu").fingerprint
    assert checkpoint["model_class"] == "LlamaForCausalLM"
    assert checkpoint["model_type"] == "llama"
    assert checkpoint["dtype"] == "float32"
    assert checkpoint["hidden_size"] == 64


def test_environment_metadata(default_trace):
    environment = default_trace("llama").environment

    assert environment["device"] == "cpu"
    assert environment["pytest_spinal"] == pytest_spinal.__version__
    assert environment["torch"] == torch.__version__
    assert environment["transformers"] == transformers.__version__
    assert environment["python"] == platform.python_version()


def test_settings_and_run_metadata(default_trace):
    trace = default_trace("llama")

    assert trace.settings == TraceSettings()
    assert trace.schema_version == SCHEMA_VERSION
    assert trace.run == {"batch_size": 8, "chunk_size": 256}


# Settings


def test_last_positions_one_per_prompt(tiny_model):
    trace = trace_checkpoint(tiny_model("gpt2"), device="cpu", settings=TraceSettings(positions="last"))

    assert trace.probes["positions_traced"] == DEFAULT_PROMPTS
    assert len(trace.transport_per_prompt) == DEFAULT_PROMPTS
    # One position per prompt, so the overall mean is the plain mean over prompts.
    torch.testing.assert_close(
        as_tensor(trace.transport), as_tensor(trace.transport_per_prompt).mean(dim=0), rtol=0.0, atol=1e-12
    )


def test_last_positions_chat_model_error(tiny_model):
    # Every chat-formatted prompt ends in the same template tokens, so the 56 embedding-layer
    # states of the last positions are one vector. The error should name that low rank instead
    # of asking for more tokens.
    with pytest.raises(TraceError) as raised:
        trace_checkpoint(tiny_model("llama"), device="cpu", settings=TraceSettings(positions="last"))

    message = str(raised.value)
    assert "numerical rank 1" in message
    assert "at least 18 real tokens" not in message


def test_chat_template_disabled_recorded(tiny_model, default_trace):
    trace = trace_checkpoint(tiny_model("llama"), device="cpu", chat_template=False)

    assert trace.probes["chat_template"] is False
    assert trace.probes["fingerprint"] != default_trace("llama").probes["fingerprint"]


def test_tail_window_recorded(tiny_model):
    settings = TraceSettings(tail_window=(0.25, 0.75))

    trace = trace_checkpoint(tiny_model("gpt2"), device="cpu", settings=settings)

    assert trace.settings.tail_window == (0.25, 0.75)


# Errors


@pytest.mark.parametrize(
    ("family", "block_weight", "layer"),
    [
        # hidden_states[0] is the embedding output and hidden_states[l] the output of block l,
        # so the block at index 2 writes layer 3.
        ("llama", "model.layers.2.mlp.down_proj.weight", 3),
        ("gpt2", "transformer.h.0.mlp.c_proj.weight", 1),
    ],
)
def test_non_finite_states_name_layer(family, block_weight, layer):
    model, tokenizer = load_tiny_model(family)
    with torch.no_grad():
        model.get_parameter(block_weight).fill_(math.inf)

    with pytest.raises(TraceError, match=f"hidden states of layer {layer} contain NaN or infinity"):
        trace_checkpoint((model, tokenizer), device="cpu")


def test_too_few_tokens(tiny_model):
    with pytest.raises(TraceError) as raised:
        trace_checkpoint(tiny_model("llama"), probes=["Hi.", "Yes."], device="cpu", chat_template=False)

    message = str(raised.value)
    assert message.startswith("layer 0:")
    assert "at least 18 real tokens" in message


@pytest.mark.parametrize(("batch_size", "chunk_size"), [(0, 256), (8, 0)])
def test_invalid_sizes_rejected(batch_size, chunk_size, tiny_model):
    with pytest.raises(TraceError, match="must both be at least 1"):
        trace_checkpoint(tiny_model("gpt2"), device="cpu", batch_size=batch_size, chunk_size=chunk_size)


# Memory


def test_lens_rows_chunked_in_two_buffers(tiny_model, monkeypatch):
    # The lens must never see layers x tokens rows at once, only up to chunk_size positions,
    # and its vocabulary-sized rows must live in two buffers, freed before each forward pass.
    rows_per_call = []
    buffers = []
    original_roots, original_buffer = LogitLens.scaled_root_probs, LogitLens.roots_buffer

    def live_buffers():
        return [buffer for buffer in (reference() for reference in buffers) if buffer is not None]

    def recording_buffer(self, rows, dtype):
        assert len(live_buffers()) < 2
        buffer = original_buffer(self, rows, dtype)
        buffers.append(weakref.ref(buffer))
        return buffer

    def recording_roots(self, states, **options):
        rows_per_call.append(states.reshape(-1, states.shape[-1]).shape[0])
        roots, norms = original_roots(self, states, **options)
        assert roots.untyped_storage().data_ptr() in {buffer.untyped_storage().data_ptr() for buffer in live_buffers()}
        return roots, norms

    def no_buffer_alive(module, args, kwargs):
        assert live_buffers() == [], "a vocabulary-sized buffer is alive during a forward pass"

    monkeypatch.setattr(LogitLens, "roots_buffer", recording_buffer)
    monkeypatch.setattr(LogitLens, "scaled_root_probs", recording_roots)
    model, tokenizer = tiny_model("llama")
    hook = resolve_lens(model).decoder.register_forward_pre_hook(no_buffer_alive, with_kwargs=True)
    try:
        trace = trace_checkpoint((model, tokenizer), device="cpu", chunk_size=32, spread=False)
    finally:
        hook.remove()

    # Positions carry over between batches, so only the last chunk is shorter.
    last_chunk = trace.probes["positions_traced"] % 32
    assert set(rows_per_call[: -(NUM_LAYERS + 1)]) == {32}
    assert set(rows_per_call[-(NUM_LAYERS + 1) :]) == {last_chunk or 32}
    # Each traced position goes through the lens once per layer, 0..L.
    assert sum(rows_per_call) == (NUM_LAYERS + 1) * trace.probes["positions_traced"]
    # Two buffers per batch with full chunks, plus two for the last chunk.
    assert len(buffers) % 2 == 0
    assert 2 < len(buffers) <= 2 * (math.ceil(DEFAULT_PROMPTS / 8) + 1)


def test_heap_trimmed_once_per_batch(tiny_model, monkeypatch):
    from pytest_spinal import tracing

    if platform.libc_ver()[0] == "glibc":
        assert tracing._malloc_trim() is not None
    calls = []
    monkeypatch.setattr(tracing, "_malloc_trim", lambda: calls.append)
    trace_checkpoint(tiny_model("gpt2"), device="cpu", batch_size=16, spread=False)

    assert calls == [0] * math.ceil(DEFAULT_PROMPTS / 16)


@pytest.mark.parametrize("layers", [1, 4, 5])
def test_gram_sums_pair_layers(layers):
    from pytest_spinal.tracing import _GramSums

    generator = torch.Generator().manual_seed(3)
    # Batches of 300 and 40 rows: the first spans two staging blocks of 256 rows.
    batches = [[torch.randn(rows, 12, generator=generator) for _ in range(layers)] for rows in (300, 40)]
    sums = _GramSums(layers)
    for batch in batches:
        for layer, states in enumerate(batch):
            sums.add(layer, states)

    assert len(sums.pairs) == (layers + 1) // 2
    for layer in range(layers):
        states = torch.cat([batch[layer] for batch in batches]).double()
        gram, triangle = sums.gram(layer)
        expected = states.T @ states
        if triangle == "U":
            torch.testing.assert_close(gram.triu(), expected.triu())
        else:
            torch.testing.assert_close(gram.tril(), expected.tril())
        torch.testing.assert_close(
            singular_values_from_gram(gram, triangle=triangle), torch.linalg.svdvals(states), rtol=1e-9, atol=1e-9
        )


@pytest.mark.parametrize(("layers", "width"), [(5, 16), (31, 24)])
def test_gram_sums_nbytes_match_allocation(layers, width):
    from pytest_spinal.tracing import _GramSums

    sums = _GramSums(layers)
    for layer in range(layers):
        sums.add(layer, torch.ones(3, width))
    allocated = sum(tensor.numel() * tensor.element_size() for tensor in sums.pairs + sums.diagonals)

    assert _GramSums.nbytes(layers, width) == allocated


@pytest.mark.parametrize("compact", [True, False])
def test_lens_queue_fills_chunks_in_order(compact):
    from pytest_spinal.tracing import _LensQueue

    queue = _LensQueue(chunk_size=4, compact=compact)
    positions = torch.arange(17.0)
    chunks = []
    for begin, end in [(0, 5), (5, 8), (8, 17)]:
        batch = positions[begin:end].clone()
        chunks += queue.push([batch, batch * 10])
        # Rows left over from a batch are copied out of it only when compacting.
        if queue.pieces:
            shares_batch = queue.pieces[-1][0].untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()
            assert shares_batch is not compact
    chunks += queue.rest()

    assert [sum(len(part) for part in chunk[0]) for chunk in chunks] == [4, 4, 4, 4, 1]
    # The chunk 4..7 spans the first two batches: one part from each.
    assert [len(chunk[0]) for chunk in chunks] == [1, 2, 1, 1, 1]
    assert torch.equal(torch.cat([part for chunk in chunks for part in chunk[0]]), positions)
    assert torch.equal(torch.cat([part for chunk in chunks for part in chunk[1]]), positions * 10)
    assert queue.rest() == []


def test_trace_turns_tf32_off_then_restores(monkeypatch):
    from pytest_spinal.architectures import LogitLens

    # cuBLASModule proxies its flags, so monkeypatch cannot restore them: set and restore by hand.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    seen = []
    original = LogitLens.scaled_root_probs

    def recording(self, states, **options):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return original(self, states, **options)

    monkeypatch.setattr(LogitLens, "scaled_root_probs", recording)
    try:
        trace_checkpoint(tiny_model_path("gpt2"), device="cpu")
        restored = torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

    assert seen
    assert not any(seen)
    assert restored is True


# Streamed Gram matrices and chunking


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_gram_matches_kept_states(family, tiny_model, default_trace):
    # Without a spread the trace sums each layer's Gram matrix per batch instead of keeping states.
    streamed = trace_checkpoint(tiny_model(family), device="cpu", spread=False)
    with_states = default_trace(family)

    torch.testing.assert_close(as_tensor(streamed.contraction), as_tensor(with_states.contraction), rtol=0.0, atol=1e-9)
    assert streamed.transport == with_states.transport


