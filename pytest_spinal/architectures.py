"""Layouts of the supported model families: decoder, final normalisation and output head.

The logit lens must apply the model's own final normalisation, output head and output
processing (such as Gemma-2's final logit soft-capping) to intermediate hidden states, so each
family is listed explicitly rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pytest_spinal.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FamilyLayout:
    """Attribute paths of one model family, relative to the causal-LM wrapper."""

    decoder: str
    final_norm: str


#: Model families whose logit lens is tested, keyed by ``config.model_type``. The output head is
#: found through ``get_output_embeddings()``, which every transformers causal LM implements.
FAMILIES: dict[str, FamilyLayout] = {
    "llama": FamilyLayout(decoder="model", final_norm="model.norm"),
    "mistral": FamilyLayout(decoder="model", final_norm="model.norm"),
    "qwen2": FamilyLayout(decoder="model", final_norm="model.norm"),
    "gemma2": FamilyLayout(decoder="model", final_norm="model.norm"),
    "gpt2": FamilyLayout(decoder="transformer", final_norm="transformer.ln_f"),
    "gpt_neox": FamilyLayout(decoder="gpt_neox", final_norm="gpt_neox.final_layer_norm"),
}


#: Largest magnitude of a row's largest half logit for which the lens skips the shift before
#: the exponential. Then exp(2 * 30) times a vocabulary of 2**20 entries is about 1e32, far below
#: the float32 maximum of 3.4e38, and exp(-2 * 30) is far above its smallest normal number.
_UNSHIFTED_HALF_LOGIT = 30.0


def supported_families() -> str:
    """Return the supported ``model_type`` values as a comma-separated string."""
    return ", ".join(sorted(FAMILIES))


@dataclass
class LogitLens:
    """The parts of a causal LM that turn a hidden state into next-token log-probabilities."""

    decoder: torch.nn.Module
    final_norm: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None
    num_layers: int

    def logits(self, states: torch.Tensor, *, normalised: bool) -> torch.Tensor:
        """Return next-token logits for hidden states (... x d), in the model's dtype.

        Pass ``normalised=True`` for states that already went through the final normalisation,
        such as the decoder's ``last_hidden_state``. Norm, head and soft-capping run as in the
        model's own forward pass.
        """
        if not normalised:
            states = self.final_norm(states)
        return self._output(states)

    def _output(self, states: torch.Tensor) -> torch.Tensor:
        """Apply the head and any soft-capping to states that went through the final norm."""
        import torch

        logits = self.head(states)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def log_probs(self, states: torch.Tensor, *, normalised: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Return next-token log-probabilities in ``dtype`` (float32 by default, never narrower)."""
        import torch

        logits = self.logits(states, normalised=normalised)
        return torch.log_softmax(logits.to(_metric_dtype(dtype)), dim=-1)

    def root_probs(
        self, states: torch.Tensor, *, normalised: bool, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return square roots of next-token probabilities, the input of the Fisher-Rao distance.

        See :meth:`scaled_root_probs` for how they are computed and for ``out``.
        """
        roots, norms = self.scaled_root_probs(states, normalised=normalised, dtype=dtype, out=out)
        return roots.div_(norms)

    def scaled_root_probs(
        self, states: torch.Tensor, *, normalised: bool, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return square roots of next-token probabilities times a positive factor per row, and that factor.

        ``sqrt(p)`` is ``roots / norms``, where ``norms`` has one column. Where the head is a
        plain bias-free linear layer in the metric dtype and no soft-capping applies
        (:meth:`fuses_roots`), the roots come from half the logits: ``sqrt(softmax(z))`` is
        ``exp(z/2 - c)`` divided by its Euclidean norm, for any shift ``c``. Halving the states
        before the product is exact, and the shift and exponential run in place on the
        product's output. ``out``, from :meth:`roots_buffer` and cut to the states' rows,
        receives the product, so a caller that reuses two buffers allocates no
        vocabulary-sized rows after the first. Other heads take a softmax and a square root,
        return norms of 1 and ignore ``out``. Probabilities that underflow to 0 in float32
        (below about 1e-38) change the distance by far less than float32 rounding.
        """
        import torch

        metric_dtype = _metric_dtype(dtype)
        if not normalised:
            states = self.final_norm(states)
        if not self.fuses_roots(metric_dtype):
            roots = torch.softmax(self._output(states).to(metric_dtype), dim=-1).sqrt_()
            return roots, torch.ones((*roots.shape[:-1], 1), dtype=metric_dtype, device=roots.device)

        weight = self.head.weight
        # In-place passes and out= carry no gradient, and the lens is never trained through.
        with torch.no_grad():
            roots = torch.matmul(states.to(device=weight.device, dtype=metric_dtype) * 0.5, weight.T, out=out)
            peak = roots.amax(dim=-1, keepdim=True)
            # Without a shift, exp(z/2) and the sum of its squares stay finite and normal while every
            # row's largest half logit lies within +-30, so the shift's pass is skipped then.
            if bool(peak.abs().max() > _UNSHIFTED_HALF_LOGIT):
                roots.sub_(peak)
            roots.exp_()
            return roots, torch.linalg.vector_norm(roots, dim=-1, keepdim=True)

    def fuses_roots(self, dtype: torch.dtype) -> bool:
        """Return whether :meth:`scaled_root_probs` computes roots in ``dtype`` in place from one product."""
        import torch

        # accelerate's hooks (device maps, offloading) place or load the weight only inside the
        # head's own forward call, so hooked heads take the generic path.
        return (
            type(self.head) is torch.nn.Linear
            and not hasattr(self.head, "_hf_hook")
            and self.head.bias is None
            and self.softcap is None
            and self.head.weight.dtype == dtype
        )

    def roots_buffer(self, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Return an empty ``rows`` x vocabulary tensor for ``root_probs(out=...)``, or ``None`` where roots are not fused."""
        import torch

        if not self.fuses_roots(dtype):
            return None
        weight = self.head.weight
        return torch.empty((rows, weight.shape[0]), dtype=dtype, device=weight.device)


def resolve_lens(model: torch.nn.Module) -> LogitLens:
    """Find the decoder, final norm and output head of ``model``.

    Raises:
        UnsupportedModelError: for encoder-only or encoder-decoder models, models without an
            output head, and families whose layout is not known.
    """
    class_name = type(model).__name__
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)

    if config is None or getattr(config, "is_encoder_decoder", False) or not _is_causal_lm(model):
        raise UnsupportedModelError(
            f"{class_name} is not a decoder-only causal language model; pytest-spinal traces "
            f"causal LMs (AutoModelForCausalLM) of these families: {supported_families()}"
        )

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedModelError(
            f"{class_name} has no output head (get_output_embeddings() returned None), so the "
            f"logit lens cannot be formed; load the model with AutoModelForCausalLM"
        )

    layout = FAMILIES.get(model_type)
    if layout is None:
        raise UnsupportedModelError(
            f"{class_name} (model_type {model_type!r}) is not a supported family: the logit lens "
            f"needs its final normalisation, which is known for {supported_families()}"
        )

    final_norm = _get_path(model, layout.final_norm)
    if final_norm is None:
        raise UnsupportedModelError(
            f"{class_name} has no final normalisation at {layout.final_norm!r}, where "
            f"model_type {model_type!r} keeps it; supported families: {supported_families()}"
        )

    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitLens(
        decoder=_get_path(model, layout.decoder),
        final_norm=final_norm,
        head=head,
        softcap=float(softcap) if softcap else None,
        num_layers=int(config.num_hidden_layers),
    )


def _metric_dtype(dtype: torch.dtype | None) -> torch.dtype:
    import torch

    return torch.promote_types(dtype or torch.float32, torch.float32)


def _is_causal_lm(model: torch.nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _get_path(root: object, path: str) -> object | None:
    node = root
    for name in path.split("."):
        node = getattr(node, name, None)
        if node is None:
            return None
    return node
