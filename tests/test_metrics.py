"""Tests of the contraction and transport metrics on synthetic spectra and distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytest_spinal.errors import TraceError
from pytest_spinal.metrics import (
    contraction,
    fisher_rao,
    fisher_rao_from_scaled_roots,
    numerical_rank,
    singular_values,
    tail_exponent,
    tail_window,
)

DEFAULT_WINDOW = (0.5, 0.9)

# A tail window of 8 ranks inside (0.5, 0.9) of the numerical rank needs a rank of at least 18:
# rank 18 gives ranks 9..16, rank 17 only 9..15.
RANK_NEEDED = 18


@st.composite
def log_distributions(draw, count: int = 2) -> list[torch.Tensor]:
    """Draw ``count`` float64 log-probability vectors over one vocabulary of 2 to 40 entries."""
    size = draw(st.integers(min_value=2, max_value=40))
    logits = [draw(hnp.arrays(np.float64, size, elements=st.floats(-12.0, 12.0))) for _ in range(count)]
    return [torch.log_softmax(torch.from_numpy(values), dim=-1) for values in logits]


def reference_distance(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Compute ``2 * arccos(BC)`` in float64, the textbook form of the Fisher-Rao distance."""
    coefficient = torch.exp((log_p.double() + log_q.double()) / 2).sum().item()
    return 2.0 * math.acos(min(coefficient, 1.0))


def power_law_states(exponent: float, *, scale: float, seed: int, tokens: int = 400, width: int = 200) -> torch.Tensor:
    """Build a float64 matrix with singular values ``scale * k**-exponent`` and random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(tokens, width, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    values = scale * torch.arange(1, width + 1, dtype=torch.float64) ** -exponent
    return left @ torch.diag(values) @ right.T


def random_states(seed: int, tokens: int = 120, width: int = 64) -> torch.Tensor:
    """Build a float64 Gaussian matrix whose column scales decay as 1/k, so its spectrum has a tail."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    return gaussian / torch.arange(1, width + 1, dtype=torch.float64)


# Fisher-Rao distance: properties


@settings(deadline=None, max_examples=60)
@given(log_distributions())
def test_fisher_rao_symmetric(pair):
    log_p, log_q = (values.float() for values in pair)

    assert fisher_rao(log_p, log_q).item() == fisher_rao(log_q, log_p).item()


@settings(deadline=None, max_examples=60)
@given(log_distributions(count=1))
def test_fisher_rao_identical_is_zero(single):
    (log_p,) = single

    assert fisher_rao(log_p.float(), log_p.float()).item() == 0.0


@settings(deadline=None, max_examples=60)
@given(log_distributions())
def test_fisher_rao_within_zero_and_pi(pair):
    distance = fisher_rao(*pair).item()

    assert distance >= 0.0
    assert distance <= math.pi


@settings(deadline=None, max_examples=80)
@given(log_distributions(count=3))
def test_fisher_rao_triangle_inequality(triple):
    log_p, log_q, log_r = (values.float() for values in triple)

    direct = fisher_rao(log_p, log_r).item()
    detour = fisher_rao(log_p, log_q).item() + fisher_rao(log_q, log_r).item()

    assert direct <= detour + 1e-5


@settings(deadline=None, max_examples=60)
@given(log_distributions())
def test_fisher_rao_matches_arccos_form(pair):
    log_p, log_q = pair
    # Away from BC = 1 the float64 arccos is accurate, so it serves as the reference.
    assume(torch.exp((log_p + log_q) / 2).sum().item() < 0.999)
    expected = reference_distance(log_p, log_q)

    from_float64 = fisher_rao(log_p, log_q).item()
    from_float32 = fisher_rao(log_p.float(), log_q.float()).item()

    assert from_float64 == pytest.approx(expected, rel=0.0, abs=1e-9)
    assert from_float32 == pytest.approx(expected, rel=0.0, abs=1e-5)


# Fisher-Rao distance: accuracy for nearly equal distributions


def nearly_equal_pair(vocabulary: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float64 log-probabilities of a random distribution and of a 1e-4 logit perturbation of it."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(vocabulary, generator=generator, dtype=torch.float64)
    perturbed = logits + 1e-4 * torch.randn(vocabulary, generator=generator, dtype=torch.float64)
    return torch.log_softmax(logits, dim=-1), torch.log_softmax(perturbed, dim=-1)


@pytest.mark.parametrize("vocabulary", [16, 512, 4096])
def test_fisher_rao_nearly_equal_float64(vocabulary):
    log_p, log_q = nearly_equal_pair(vocabulary, seed=vocabulary)
    # With BC about 1 - 1e-9 the float64 arccos reference is itself off by up to about 2e-7 of
    # the distance (checked against 50-digit arithmetic for these three seeds).
    expected = reference_distance(log_p, log_q)

    assert fisher_rao(log_p, log_q).item() == pytest.approx(expected, rel=1e-6, abs=0.0)


@pytest.mark.parametrize("vocabulary", [16, 512, 4096])
def test_fisher_rao_nearly_equal_float32(vocabulary):
    log_p, log_q = nearly_equal_pair(vocabulary, seed=vocabulary)
    expected = reference_distance(log_p, log_q)
    log_p32, log_q32 = log_p.float(), log_q.float()

    # Rounding the inputs to float32 alone moves a distance of about 1e-4 by up to about 5e-7.
    assert fisher_rao(log_p32, log_q32).item() == pytest.approx(expected, rel=0.0, abs=1e-6)

    # The textbook float32 arccos is off by more than a tenth of the distance, so the check above
    # would catch an implementation that used it.
    coefficient = torch.exp((log_p32 + log_q32) / 2).sum().clamp(max=1.0)
    naive = (2.0 * torch.acos(coefficient)).item()
    assert abs(naive - expected) > 1e-5


# Fisher-Rao distance: pinned values


def log_probabilities(*probabilities: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=dtype).log()


@settings(deadline=None, max_examples=60)
@given(log_distributions(), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_scaled_roots_match_fisher_rao(pair, scale_p, scale_q):
    log_p, log_q = pair
    norm_p = torch.tensor([[scale_p]], dtype=torch.float64)
    norm_q = torch.tensor([[scale_q]], dtype=torch.float64)
    root_p = (log_p * 0.5).exp()[None] * norm_p
    root_q = (log_q * 0.5).exp()[None] * norm_q

    distance = fisher_rao_from_scaled_roots(root_p, norm_p, root_q, norm_q)

    assert distance.item() == pytest.approx(fisher_rao(log_p, log_q).item(), abs=1e-12)


def test_fisher_rao_half_against_point():
    # BC = sqrt(1/2), so the distance is 2 * arccos(1/sqrt(2)) = pi/2.
    distance = fisher_rao(log_probabilities(0.5, 0.5), log_probabilities(1.0, 0.0))

    assert distance.item() == pytest.approx(math.pi / 2, rel=1e-12)


def test_fisher_rao_quarter_swap():
    # BC = 2 * sqrt(3/16) = sqrt(3)/2, so the distance is 2 * arccos(sqrt(3)/2) = pi/3.
    distance = fisher_rao(log_probabilities(0.25, 0.75), log_probabilities(0.75, 0.25))

    assert distance.item() == pytest.approx(math.pi / 3, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fisher_rao_disjoint_is_pi(dtype):
    distance = fisher_rao(log_probabilities(0.5, 0.5, 0.0, 0.0, dtype=dtype), log_probabilities(0.0, 0.0, 0.3, 0.7, dtype=dtype))

    torch.testing.assert_close(distance, torch.tensor(math.pi, dtype=dtype))


def test_fisher_rao_disjoint_at_most_pi():
    distance = fisher_rao(log_probabilities(1.0, 0.0), log_probabilities(0.0, 1.0))

    assert distance.item() <= math.pi


def test_fisher_rao_zero_entries_identical():
    log_p = log_probabilities(0.2, 0.0, 0.8)

    assert fisher_rao(log_p, log_p).item() == 0.0


def test_fisher_rao_rowwise_shape():
    log_p = torch.log_softmax(torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)), dim=-1)

    assert fisher_rao(log_p, log_p.flip(0)).shape == (3, 5)


def test_fisher_rao_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        fisher_rao(torch.zeros(4), torch.zeros(5))


# Singular values and numerical rank


@pytest.mark.parametrize(("tokens", "width"), [(30, 64), (200, 64)])
def test_singular_values_match_svdvals(tokens, width):
    states = torch.randn(tokens, width, generator=torch.Generator().manual_seed(tokens), dtype=torch.float64)

    torch.testing.assert_close(singular_values(states), torch.linalg.svdvals(states), rtol=1e-10, atol=0.0)


def test_singular_values_float64_from_float32():
    states = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))

    assert singular_values(states).dtype == torch.float64


def test_singular_values_reject_3d():
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.zeros(2, 3, 4))


def test_numerical_rank_rank_deficient():
    generator = torch.Generator().manual_seed(2)
    factor_left = torch.randn(100, 5, generator=generator, dtype=torch.float64)
    factor_right = torch.randn(5, 64, generator=generator, dtype=torch.float64)
    states = factor_left @ factor_right

    assert numerical_rank(singular_values(states), shape=(100, 64)) == 5


def test_numerical_rank_pinned_cutoff():
    values = torch.tensor([1.0, 1e-3, 1e-6], dtype=torch.float64)

    # The cut-off is s_1 * max(N, d) * eps(float32), with eps(float32) = 2**-23 ~ 1.19e-7:
    # 3.6e-7 for a 3 x 3 matrix keeps 1e-6, and 1.19e-6 for a 10 x 10 matrix drops it.
    assert numerical_rank(values, shape=(3, 3)) == 3
    assert numerical_rank(values, shape=(10, 10)) == 2


def test_numerical_rank_zero_matrix():
    assert numerical_rank(torch.zeros(4, dtype=torch.float64), shape=(4, 4)) == 0


def test_tail_window_pinned():
    # ceil(0.5 * 20) = 10 and floor(0.9 * 20) = 18. For rank 17, ceil(8.5) = 9 and floor(15.3) = 15.
    assert tail_window(20, DEFAULT_WINDOW) == (10, 18)
    assert tail_window(17, DEFAULT_WINDOW) == (9, 15)


# Contraction (spectral tail exponent)


# Exponents above about 3.2 leave fewer than 18 singular values of a 400 x 200 matrix above the
# float32 rank cut-off (s_1 * 400 * 1.19e-7), so the fit is refused. The largest exponent tested is 3.0.
@settings(deadline=None, max_examples=15)
@given(
    exponent=st.floats(min_value=0.3, max_value=3.0),
    scale=st.floats(min_value=1e-3, max_value=1e3),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_contraction_recovers_power_law(exponent, scale, seed):
    states = power_law_states(exponent, scale=scale, seed=seed)

    assert contraction(states) == pytest.approx(exponent, rel=0.0, abs=1e-6)


def test_tail_exponent_exact_power_law():
    values = 3.0 * torch.arange(1, 201, dtype=torch.float64) ** -1.5

    assert tail_exponent(values, window=DEFAULT_WINDOW, shape=(400, 200)) == pytest.approx(1.5, abs=1e-12)


def test_tail_exponent_ignores_spectrum_head():
    # Slope -1 up to rank 10, then 100 * k**-3 (continuous at k = 10). All 20 values are above the
    # cut-off, so the window is ranks 10..18, which lie on the k**-3 part only.
    ranks = torch.arange(1, 21, dtype=torch.float64)
    values = torch.where(ranks <= 10, 1.0 / ranks, 100.0 * ranks**-3)

    assert tail_exponent(values, window=DEFAULT_WINDOW, shape=(20, 20)) == pytest.approx(3.0, abs=1e-12)


@settings(deadline=None, max_examples=25)
@given(scale=st.floats(min_value=1e-3, max_value=1e3), seed=st.integers(min_value=0, max_value=2**31))
def test_contraction_scale_invariant(scale, seed):
    states = random_states(seed)

    assert contraction(scale * states) == pytest.approx(contraction(states), rel=0.0, abs=1e-9)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(min_value=0, max_value=2**31))
def test_contraction_rotation_invariant(seed):
    states = random_states(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))

    assert contraction(states @ rotation) == pytest.approx(contraction(states), rel=0.0, abs=1e-9)


def test_contraction_too_few_tokens():
    states = torch.randn(12, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    with pytest.raises(TraceError) as raised:
        contraction(states)

    message = str(raised.value)
    assert "numerical rank 12" in message
    assert f"at least {RANK_NEEDED} real tokens" in message


def test_contraction_enough_tokens_at_threshold():
    states = torch.randn(RANK_NEEDED, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    assert math.isfinite(contraction(states))


def test_low_rank_error_blames_rank():
    # 400 tokens are plenty, but the states span only 5 directions, so an error that asks for more
    # tokens sends the user the wrong way.
    generator = torch.Generator().manual_seed(5)
    states = torch.randn(400, 5, generator=generator, dtype=torch.float64) @ torch.randn(5, 200, generator=generator, dtype=torch.float64)

    with pytest.raises(TraceError) as raised:
        contraction(states)

    message = str(raised.value)
    assert "numerical rank 5" in message
    assert f"at least {RANK_NEEDED} real tokens" not in message
