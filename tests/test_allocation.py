"""Whole-model allocation rules: the one-beta LEGO search, measured loss curves, the
scale-free relative rule, the rule names, and the SVD cache that searches rely on."""

from __future__ import annotations

import numpy as np
import pytest
from conv_models import ConvSpec, conv_chain
from hypothesis import given, settings
from hypothesis import strategies as st

from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.gdws.allocation import (
    ALLOCATIONS,
    LayerCost,
    LossCurve,
    UnreachableTargetError,
    allocate,
    allocate_by_beta,
    curve_gains,
    resolve_allocation,
)
from gdws_deploy.passes.gdws.decompose import ChannelSpectra, SpectraCache, lego
from gdws_deploy.pipeline.convert import convert

PROPERTY = settings(max_examples=15, deadline=None)


def random_layers(seed: int, count: int = 3):
    """Spectra and costs of `count` random conv layers with different weight scales."""
    rng = np.random.default_rng(seed)
    spectra, costs = [], []
    for _ in range(count):
        m, c, pixels = (int(v) for v in rng.integers(2, 17, size=3))
        weight = rng.standard_normal((m, c, 3, 3)) * rng.uniform(0.1, 10.0)
        spectra.append(ChannelSpectra.from_weight(weight))
        costs.append(LayerCost(kernel_macs=(9 + m) * pixels, dense_macs=m * c * 9 * pixels))
    return spectra, costs


def macs_of(kernels, costs, fixed):
    return fixed + sum(
        c.dense_macs if k is None else k * c.kernel_macs for k, c in zip(kernels, costs)
    )


@PROPERTY
@given(st.integers(0, 2**32 - 1), st.floats(1.0, 3.0))
def test_one_beta_is_the_least_lego_bound_that_reaches_the_target(seed, target):
    spectra, costs = random_layers(seed)
    ranked = [s.ranked_energies() for s in spectra]
    before = sum(c.dense_macs for c in costs)

    def lego_kernels(beta):  # per-layer LEGO itself, dense where it saves nothing
        counts = [lego(s, beta).kernels for s in spectra]
        return [None if k * c.kernel_macs >= c.dense_macs else k for k, c in zip(counts, costs)]

    betas = np.unique(np.concatenate([np.cumsum(r[::-1]) for r in ranked] + [[0.0]]))
    least = next((b for b in betas if before / macs_of(lego_kernels(b), costs, 0) >= target), None)
    try:
        kernels = allocate_by_beta(ranked, costs, 0, target)
    except UnreachableTargetError:
        assert least is None
        return
    assert least is not None and kernels == lego_kernels(least)


def test_one_beta_says_how_far_it_can_go():
    spectra, costs = random_layers(1)
    ranked = [s.ranked_energies() for s in spectra]
    with pytest.raises(UnreachableTargetError, match="cannot reach 500x fewer MACs: at most"):
        allocate_by_beta(ranked, costs, 0, 500.0)


def test_relative_rule_ignores_how_each_layer_is_scaled():
    """ReLU networks are unchanged when one layer is scaled up and the next down: an
    allocation that answers differently is judging the scale, not the layer."""
    spectra, costs = random_layers(7)
    weight = spectra[0].u * spectra[0].s[:, None, :] @ spectra[0].vt  # (C, M, k)
    rescaled = ChannelSpectra.from_weight(
        100.0 * weight.transpose(1, 0, 2).reshape(spectra[0].out_channels, -1, 3, 3)
    )
    kernels = {}
    for rule in ("relative", "energy"):
        plain = allocate(rule, spectra, costs, 0, 2.0)
        scaled = allocate(rule, [rescaled, *spectra[1:]], costs, 0, 2.0)
        kernels[rule] = [[None if f is None else f.kernels for f in p] for p in (plain, scaled)]
    assert kernels["relative"][0] == kernels["relative"][1]
    assert kernels["energy"][0] != kernels["energy"][1]


def test_measured_gains_follow_a_convex_curve_and_end_at_zero_loss():
    spectra = ChannelSpectra.from_weight(np.random.default_rng(0).standard_normal((8, 4, 3, 3)))
    curve = LossCurve(np.array([0, 4, 8, 16]), np.array([8.0, 4.0, 2.0, 1.0]))
    gains = curve_gains(curve, spectra)
    assert gains.shape == (spectra.s.size,)
    np.testing.assert_allclose(gains[:4], 1.0, rtol=1e-5)
    np.testing.assert_allclose(gains[4:8], 0.5, rtol=1e-5)
    np.testing.assert_allclose(gains[16:], 1.0 / (spectra.s.size - 16), rtol=1e-3)
    assert np.all(np.diff(gains) <= 0)
    assert gains.sum() == pytest.approx(8.0, rel=1e-5)  # all kernels save the zeroed loss


def test_measured_gains_skip_a_bump_and_treat_noise_below_zero_as_zero():
    spectra = ChannelSpectra.from_weight(np.random.default_rng(0).standard_normal((8, 4, 3, 3)))
    curve = LossCurve(np.array([0, 4, 8, 12]), np.array([6.0, 5.5, 2.0, -0.1]))
    gains = curve_gains(curve, spectra)
    np.testing.assert_allclose(gains[:8], 0.5, rtol=1e-5)  # straight from (0, 6) to (8, 2)
    np.testing.assert_allclose(gains[8:12], 0.5, rtol=1e-5)  # on to (12, 0)
    assert np.all(gains[12:] < 1e-5)  # only the tie-break is left


def test_measured_rule_gives_kernels_to_the_layer_whose_loss_falls_fastest():
    spectra, costs = random_layers(3, count=2)
    steep = LossCurve(np.array([0, 2]), np.array([10.0, 5.0]))
    flat = LossCurve(np.array([0, 2]), np.array([0.1, 0.05]))
    for curves, favoured in (([steep, flat], 0), ([flat, steep], 1)):
        factors = allocate("measured", spectra, costs, 0, 1.5, curves=curves)
        share = [f.kernels / s.s.size if f else 1.0 for f, s in zip(factors, spectra)]
        assert share[favoured] > share[1 - favoured]


@pytest.mark.parametrize(
    "curve, message",
    [
        (LossCurve(np.array([1, 2]), np.array([1.0, 0.5])), "rise from 0"),
        (LossCurve(np.array([0, 2, 2]), np.array([1.0, 0.5, 0.2])), "rise from 0"),
        (LossCurve(np.array([0, 1]), np.array([1.0])), "matching"),
        (LossCurve(np.array([0, 1]), np.array([np.nan, 1.0])), "NaN"),
    ],
)
def test_malformed_loss_curves_are_errors(curve, message):
    spectra = ChannelSpectra.from_weight(np.ones((2, 2, 3, 3)))
    with pytest.raises(GdwsError, match=message):
        curve_gains(curve, spectra)


def test_allocation_names_and_what_auto_means():
    assert set(ALLOCATIONS) == {"auto", "measured", "relative", "energy", "alpha", "lego"}
    assert resolve_allocation("auto", has_curves=True) == "measured"
    assert resolve_allocation("auto", has_curves=False) == "relative"
    assert resolve_allocation("lego", has_curves=True) == "lego"
    with pytest.raises(GdwsError, match="unknown allocation 'greedy'"):
        resolve_allocation("greedy", has_curves=False)


def test_rules_that_need_inputs_say_so():
    spectra, costs = random_layers(2)
    with pytest.raises(GdwsError, match="'alpha' needs alphas"):
        allocate("alpha", spectra, costs, 0, 2.0)
    with pytest.raises(GdwsError, match="'measured' needs a loss curve"):
        allocate("measured", spectra, costs, 0, 2.0)


def test_spectra_cache_runs_one_svd_per_layer_until_the_weight_changes():
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3))
    cache = SpectraCache()
    first = cache.get("conv", weight)
    assert cache.get("conv", weight.copy()) is first and cache.computed == 1
    assert cache.get("conv", weight * 2) is not first and cache.computed == 2


def chain():
    specs = [ConvSpec(16, weights="random", pads=(1, 1, 1, 1)) for _ in range(3)]
    return conv_chain(specs, input_shape=(8, 12, 12), dense_head=True)


@pytest.mark.parametrize("allocation", ["relative", "energy", "lego"])
def test_convert_reaches_the_target_with_each_rule_and_reports_it(allocation):
    cache = SpectraCache()
    _, report = convert(
        chain(), mac_reduction=2.0, allocation=allocation, check_parity=False, spectra_cache=cache
    )
    assert report.reduction >= 2.0 and report.allocation == allocation
    assert cache.computed == 2  # the first conv is not eligible


def test_convert_measured_rule_uses_curves_and_auto_picks_it():
    model = chain()
    names = [row.name for row in convert(model, mac_reduction=1.5, check_parity=False)[1].layers]
    curves = {name: LossCurve(np.array([0, 8]), np.array([1.0, 0.5])) for name in names[1:]}
    _, report = convert(model, mac_reduction=1.5, loss_curves=curves, check_parity=False)
    assert report.allocation == "measured" and report.reduction >= 1.5
    with pytest.raises(GdwsError, match="no measured loss curve for Conv"):
        convert(model, mac_reduction=1.5, loss_curves={}, check_parity=False)


def test_convert_refuses_alphas_that_the_rule_would_ignore():
    model = chain()
    names = [row.name for row in convert(model, mac_reduction=1.5, check_parity=False)[1].layers]
    alphas = {name: np.ones(16) for name in names[1:]}
    with pytest.raises(GdwsError, match="allocation 'relative' does not use alphas"):
        convert(model, mac_reduction=1.5, alphas=alphas, check_parity=False)
    _, report = convert(
        model, mac_reduction=1.5, alphas=alphas, allocation="alpha", check_parity=False
    )
    assert report.allocation == "alpha" and report.reduction >= 1.5
