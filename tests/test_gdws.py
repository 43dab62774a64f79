"""The GDWS math stated as properties: exactness, the error bound, optimality, budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.gdws.allocation import LayerCost, allocate_budget
from gdws_deploy.passes.gdws.decompose import ChannelSpectra, lego, mego

PROPERTY = settings(max_examples=40, deadline=None)


@st.composite
def layers(draw, max_out=6, max_in=5, max_kernel=4):
    """(weight, alpha): a small float64 conv weight, sometimes low rank, and channel weights."""
    m = draw(st.integers(1, max_out))
    c = draw(st.integers(1, max_in))
    kh = draw(st.integers(1, max_kernel))
    kw = draw(st.integers(1, max_kernel))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((m, c, kh, kw))
    if draw(st.booleans()):  # structured kernels: one shared spatial profile per channel
        weight = rng.standard_normal((m, c, 1, 1)) * rng.standard_normal((1, c, kh, kw))
    alpha = None
    if draw(st.booleans()):
        alpha = rng.uniform(0.0, 3.0, size=c)
    return weight, alpha


def channel_singular_values(weight: np.ndarray) -> list:
    """Per-channel singular values, one plain SVD per channel (independent of the code)."""
    m, c, kh, kw = weight.shape
    return [np.linalg.svd(weight[:, ch].reshape(m, kh * kw), compute_uv=False) for ch in range(c)]


def weighted_error(weight: np.ndarray, approx: np.ndarray, alpha) -> float:
    a = np.ones(weight.shape[1]) if alpha is None else alpha
    per_channel = ((weight - approx) ** 2).sum(axis=(0, 2, 3))
    return float((a * per_channel).sum())


def total_energy(weight: np.ndarray, alpha) -> float:
    a = np.ones(weight.shape[1]) if alpha is None else alpha
    return float((a * (weight**2).sum(axis=(0, 2, 3))).sum())


def kept_energies(weight: np.ndarray, alpha, per_channel_counts: np.ndarray) -> np.ndarray:
    """Weighted energy of the terms the counts keep: the top g_c of each channel."""
    a = np.ones(weight.shape[1]) if alpha is None else alpha
    spectra = channel_singular_values(weight)
    return np.array(
        [a[c] * s**2 for c, s in enumerate(spectra) for s in s[: per_channel_counts[c]]]
    )


@PROPERTY
@given(layers())
def test_beta_zero_reconstructs_exactly(layer):
    weight, alpha = layer
    factors = lego(weight, 0.0, alpha)
    if alpha is not None and np.all(alpha > 0):
        np.testing.assert_allclose(factors.to_dense(), weight, atol=1e-10)
    assert factors.error == pytest.approx(0.0, abs=1e-12 * max(total_energy(weight, alpha), 1))
    assert factors.kernels >= 1


@PROPERTY
@given(layers(), st.floats(0.0, 1.2))
def test_lego_error_is_within_beta_and_one_more_drop_would_exceed_it(layer, fraction):
    weight, alpha = layer
    beta = fraction * total_energy(weight, alpha)
    factors = lego(weight, beta, alpha)
    bound = beta + ChannelSpectra.from_weight(weight).round_off_energy(alpha)
    assert factors.error <= bound  # within round-off of beta meets it
    kept = kept_energies(weight, alpha, factors.kernels_per_channel())
    assert factors.error == pytest.approx(total_energy(weight, alpha) - kept.sum(), abs=1e-9)
    if factors.kernels > 1:  # one kernel is kept even when beta would allow none
        assert factors.error + kept.min() > bound - 1e-12 * total_energy(weight, alpha)


@PROPERTY
@given(layers(max_out=3, max_in=3, max_kernel=2), st.integers(1, 9))
def test_mego_equals_brute_force_search_over_kernel_counts(layer, budget):
    weight, alpha = layer
    spectra = channel_singular_values(weight)
    a = np.ones(weight.shape[1]) if alpha is None else alpha
    best = min(
        sum(a[c] * (s[g:] ** 2).sum() for c, (s, g) in enumerate(zip(spectra, counts)))
        for counts in itertools.product(*[range(s.size + 1) for s in spectra])
        if sum(counts) <= budget
    )
    factors = mego(weight, budget, alpha)
    assert factors.kernels <= budget
    assert factors.error == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert weighted_error(weight, factors.to_dense(), alpha) == pytest.approx(best, abs=1e-9)


@PROPERTY
@given(layers(), st.floats(0.0, 1.0), st.integers(1, 40))
def test_to_dense_weighted_error_equals_reported_error(layer, fraction, budget):
    weight, alpha = layer
    for factors in (
        lego(weight, fraction * total_energy(weight, alpha), alpha),
        mego(weight, budget, alpha),
    ):
        measured = weighted_error(weight, factors.to_dense(), alpha)
        assert measured == pytest.approx(factors.error, rel=1e-9, abs=1e-9)


def test_fewer_outputs_than_kernel_taps_uses_rank_m_per_channel():
    weight = np.random.default_rng(0).standard_normal((2, 4, 3, 3))
    factors = lego(weight, 0.0)
    assert factors.kernels == 2 * 4  # rank min(M, kh*kw) = 2 per channel
    assert factors.pointwise.shape == (2, 8)
    np.testing.assert_allclose(factors.to_dense(), weight, atol=1e-12)


@pytest.mark.parametrize("kernel", [(1, 3), (3, 1), (3, 5), (2, 7)])
def test_rectangular_kernels_keep_their_shape(kernel):
    weight = np.random.default_rng(1).standard_normal((6, 3, *kernel)).astype(np.float32)
    factors = mego(weight, 4)
    assert factors.depthwise.shape == (4, *kernel)
    assert factors.depthwise.dtype == np.float32 and factors.pointwise.dtype == np.float32
    np.testing.assert_allclose(lego(weight, 0.0).to_dense(), weight, atol=1e-5)


def test_alpha_weighting_moves_kernels_to_the_channels_that_matter():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((8, 3, 3, 3))
    favour_last = mego(weight, 8, np.array([1e-3, 1e-3, 1e3]))
    assert favour_last.kernels_per_channel().tolist() == [0, 0, 8]  # all 8 terms of channel 2
    scaled = mego(weight, 9, np.full(3, 10.0))
    plain = mego(weight, 9)
    np.testing.assert_array_equal(scaled.channels, plain.channels)
    assert scaled.error == pytest.approx(10 * plain.error)
    assert mego(weight, 27, np.array([0.0, 1.0, 1.0])).kernels_per_channel()[0] == 0


def test_beta_at_or_above_total_energy_keeps_one_kernel():
    weight = np.random.default_rng(3).standard_normal((5, 4, 3, 3))
    energy = total_energy(weight, None)
    largest = max(s[0] ** 2 for s in channel_singular_values(weight))
    for beta in (energy, 10 * energy):
        factors = lego(weight, beta)
        assert factors.kernels == 1
        assert factors.error == pytest.approx(energy - largest)


def test_ties_go_to_the_lower_channel_deterministically():
    channel = np.random.default_rng(4).standard_normal((4, 1, 3, 3))
    weight = np.concatenate([channel, channel, channel], axis=1)
    first = mego(weight, 4)
    again = mego(weight.copy(), 4)
    assert first.kernels_per_channel().tolist() == [2, 1, 1]
    np.testing.assert_array_equal(first.channels, again.channels)
    np.testing.assert_array_equal(first.depthwise, again.depthwise)


def test_spectra_are_reused_for_both_methods():
    weight = np.random.default_rng(5).standard_normal((6, 4, 3, 3))
    spectra = ChannelSpectra.from_weight(weight)
    assert spectra.rank == 6 and spectra.s.shape == (4, 6)
    np.testing.assert_array_equal(mego(spectra, 7).channels, mego(weight, 7).channels)
    assert lego(spectra, 1.0).error == lego(weight, 1.0).error


@pytest.mark.parametrize(
    "call",
    [
        lambda w: lego(w, -1.0),
        lambda w: lego(w, float("nan")),
        lambda w: mego(w, 0),
        lambda w: mego(w, 2.5),
        lambda w: mego(w, 3, np.ones(5)),
        lambda w: lego(w.astype(np.int32), 0.0),
        lambda w: lego(np.where(w > 0, np.inf, w), 0.0),
        lambda w: lego(w[0], 0.0),
    ],
)
def test_bad_arguments_raise_gdws_error(call):
    with pytest.raises(GdwsError):
        call(np.random.default_rng(6).standard_normal((4, 3, 3, 3)))


@st.composite
def budgets(draw):
    """Ranked energies and costs of a few layers, plus MACs outside them."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    count = draw(st.integers(1, 5))
    energies, costs = [], []
    for _ in range(count):
        m, c, pixels = (int(v) for v in rng.integers(2, 33, size=3))
        kernels = c * min(m, 9)
        energies.append(np.sort(rng.exponential(size=kernels))[::-1])
        costs.append(LayerCost(kernel_macs=(9 + m) * pixels, dense_macs=m * c * 9 * pixels))
    fixed = int(rng.integers(0, 1000))
    return energies, costs, fixed


@PROPERTY
@given(budgets(), st.floats(1.0, 4.0))
def test_allocate_budget_reaches_the_target_or_says_it_cannot(problem, target):
    energies, costs, fixed = problem
    before = fixed + sum(cost.dense_macs for cost in costs)
    try:
        kernels = allocate_budget(energies, costs, fixed, target)
    except GdwsError:
        floor = fixed + sum(min(cost.kernel_macs, cost.dense_macs) for cost in costs)
        assert before / floor < target
        return
    after = fixed + sum(
        cost.dense_macs if k is None else k * cost.kernel_macs for k, cost in zip(kernels, costs)
    )
    assert before / after >= target * (1 - 1e-12)
    for k, cost, energy in zip(kernels, costs, energies):
        assert k is None or (1 <= k <= energy.size and k * cost.kernel_macs < cost.dense_macs)


def test_allocate_budget_raises_when_one_kernel_per_layer_is_too_many():
    energies = [np.array([3.0, 2.0, 1.0])]
    costs = [LayerCost(kernel_macs=10, dense_macs=100)]
    with pytest.raises(GdwsError, match="cannot reach"):
        allocate_budget(energies, costs, fixed_macs=1000, target_reduction=2.0)
    with pytest.raises(GdwsError):
        allocate_budget(energies, costs, fixed_macs=0, target_reduction=0.5)


def test_allocate_budget_spends_kernels_where_error_per_mac_is_highest():
    energies = [np.array([5.0, 4.0, 3.0]), np.array([1.0, 0.5, 0.2])]
    costs = [LayerCost(kernel_macs=10, dense_macs=1000), LayerCost(kernel_macs=10, dense_macs=1000)]
    kernels = allocate_budget(energies, costs, fixed_macs=0, target_reduction=2000 / 40)
    assert kernels == [3, 1]
