"""The two SPINAL metrics: contraction (spectral tail exponent) and transport (Fisher-Rao distance).

Functions here take plain tensors and know nothing of models, so they can be tested on synthetic
spectra and distributions.
"""

from __future__ import annotations

import math

import torch

from pytest_spinal.errors import TraceError

#: Smallest number of ranks a tail window may hold before a slope fit is refused.
MIN_WINDOW_POINTS = 8

_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def singular_values(states: torch.Tensor) -> torch.Tensor:
    """Return the singular values of ``states`` (N x d), largest first, in float64.

    They come from the eigenvalues of the smaller Gram matrix (d x d or N x N) computed in float64.
    Squaring costs nothing that matters here: float64 eigenvalues stay accurate down to about
    1e-8 of the largest singular value, far below the numerical-rank cut-off at ``eps(float32)``.
    """
    if states.ndim != 2:
        raise ValueError(f"states must be a 2-D tensor (tokens x hidden size), got shape {tuple(states.shape)}")

    states = states.to(torch.float64)
    tokens, width = states.shape
    return singular_values_from_gram(states.T @ states if width <= tokens else states @ states.T)


def singular_values_from_gram(gram: torch.Tensor, *, triangle: str = "L") -> torch.Tensor:
    """Return singular values, largest first, from a Gram matrix ``X.T @ X`` (or a batch of them).

    The Gram matrix should be float64; only its ``triangle`` (``"L"`` lower or ``"U"`` upper,
    diagonal included) is read. Its eigenvalues are the squared singular values of ``X``;
    rounding can leave those of a rank-deficient matrix slightly negative, and they become 0.
    """
    eigenvalues = torch.linalg.eigvalsh(gram, UPLO=triangle)
    return eigenvalues.clamp(min=0.0).sqrt().flip(-1)


def numerical_rank(values: torch.Tensor, *, shape: tuple[int, int]) -> int:
    """Count singular values above ``s_1 * max(N, d) * eps(float32)`` for a matrix of ``shape``."""
    if values.numel() == 0 or values[0] <= 0:
        return 0

    cutoff = values[0].item() * max(shape) * _FLOAT32_EPS
    return int((values > cutoff).sum().item())


def tail_window(rank: int, window: tuple[float, float]) -> tuple[int, int]:
    """Return the first and last 1-based rank of the tail window ``[ceil(lo * r), floor(hi * r)]``."""
    low, high = window
    return max(1, math.ceil(low * rank)), math.floor(high * rank)


def tail_exponent(values: torch.Tensor, *, window: tuple[float, float], shape: tuple[int, int]) -> float:
    """Fit the spectral tail exponent (contraction) of singular values ``values``, largest first.

    The exponent is minus the least-squares slope of ``log s_k`` against ``log k`` over the tail
    window of the numerical rank. A pure power law ``s_k = c * k**-a`` gives exactly ``a``. It is
    unitless, scale-invariant and usually between 0 and 10; higher means the representation is
    squeezed into fewer directions.

    Raises:
        TraceError: when the window contains fewer than ``MIN_WINDOW_POINTS`` ranks.
    """
    rank = numerical_rank(values, shape=shape)
    first, last = tail_window(rank, window)
    points = last - first + 1
    if points < MIN_WINDOW_POINTS:
        raise TraceError(_window_too_small(points, rank=rank, shape=shape, window=window))

    ranks = torch.arange(first, last + 1, dtype=torch.float64)
    log_rank = ranks.log()
    log_value = values[first - 1 : last].log()
    centred_rank = log_rank - log_rank.mean()
    slope = (centred_rank * (log_value - log_value.mean())).sum() / (centred_rank * centred_rank).sum()
    return -slope.item()


def contraction(states: torch.Tensor, *, window: tuple[float, float] = (0.5, 0.9)) -> float:
    """Compute the contraction score of one layer's real-token hidden states (N x d)."""
    return tail_exponent(singular_values(states), window=window, shape=(states.shape[0], states.shape[1]))


def _window_too_small(points: int, *, rank: int, shape: tuple[int, int], window: tuple[float, float]) -> str:
    needed = _rank_needed(window)
    summary = (
        f"the contraction tail window {window} contains {max(points, 0)} singular values "
        f"(numerical rank {rank} of a {shape[0]} x {shape[1]} hidden-state matrix), "
        f"but a slope fit needs at least {MIN_WINDOW_POINTS}"
    )
    if shape[1] < needed:
        return f"{summary}; the hidden size {shape[1]} is too small for this window: widen it"
    if shape[0] < needed:
        return f"{summary}; use a probe set with at least {needed} real tokens, or widen the window"
    return (
        f"{summary}; the {shape[0]} token states span too few directions (rank {rank}, "
        f"{needed} needed): use more varied prompts, positions='all' rather than 'last', or a wider window"
    )


def _rank_needed(window: tuple[float, float]) -> int:
    """Return the smallest numerical rank whose tail window contains ``MIN_WINDOW_POINTS`` ranks."""
    rank = MIN_WINDOW_POINTS
    while True:
        first, last = tail_window(rank, window)
        if last - first + 1 >= MIN_WINDOW_POINTS:
            return rank
        rank += 1


def fisher_rao(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Return the Fisher-Rao distance between rows of two log-probability tensors (... x V).

    The distance is ``2 * arccos(BC)`` with the Bhattacharyya coefficient
    ``BC = sum_v sqrt(p_v q_v)``. It is symmetric, 0 exactly for identical rows, at most pi, and a
    metric (it is the great-circle distance between ``sqrt(p)`` and ``sqrt(q)`` on the sphere).
    It is computed as ``4 * arcsin(||sqrt(p) - sqrt(q)|| / 2)``, which equals ``2 * arccos(BC)``
    but stays accurate when the rows are nearly equal, where ``arccos`` near 1 loses about 3e-4.
    """
    if log_p.shape != log_q.shape:
        raise ValueError(f"log-probability shapes differ: {tuple(log_p.shape)} and {tuple(log_q.shape)}")

    dtype = torch.promote_types(torch.promote_types(log_p.dtype, log_q.dtype), torch.float32)
    return fisher_rao_from_roots((log_p.to(dtype) * 0.5).exp(), (log_q.to(dtype) * 0.5).exp())


def fisher_rao_from_roots(root_p: torch.Tensor, root_q: torch.Tensor) -> torch.Tensor:
    """Return the Fisher-Rao distance between rows given as square roots of probabilities."""
    return _distance_from_chord(torch.linalg.vector_norm(root_p - root_q, dim=-1))


def fisher_rao_from_scaled_roots(
    root_p: torch.Tensor, norm_p: torch.Tensor, root_q: torch.Tensor, norm_q: torch.Tensor
) -> torch.Tensor:
    """Return the Fisher-Rao distance between rows given as ``sqrt(p) = root_p / norm_p`` and ``sqrt(q) = root_q / norm_q``.

    The norms have one column. Tracing keeps each layer's roots unscaled, so that each vocabulary
    row takes one pass for the difference and one for its length. ``root_p`` is overwritten with
    ``norm_p * (sqrt(p) - sqrt(q))``, because tracing reuses its buffer for the next layer.
    """
    difference = root_p.addcmul_(root_q, norm_p / norm_q, value=-1.0)
    return _distance_from_chord(torch.linalg.vector_norm(difference, dim=-1) / norm_p.squeeze(-1))


def _distance_from_chord(chord: torch.Tensor) -> torch.Tensor:
    # Rounding can push 4 * asin(1) a hair above pi; the distance is bounded by pi.
    return (4.0 * torch.asin((chord * 0.5).clamp(max=1.0))).clamp(max=math.pi)
