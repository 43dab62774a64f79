"""The speed-target solver: one option per layer, least error within a time and MAC budget,
checked against brute force over every combination."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.gdws.allocation import UnreachableTargetError
from gdws_deploy.speed.time_allocation import (
    MAC_STEPS,
    Budget,
    Option,
    SlowerThanBudgetError,
    choose_options,
)

PROPERTY = settings(max_examples=40, deadline=None)
FIXED_MACS, FIXED_SECONDS = 10.0, 0.5


def random_options(seed: int, layers: int):
    """Dense plus up to three cheaper options per layer: fewer MACs, more error, and
    seconds that do not follow MACs (as measured: more kernels can be slower than dense)."""
    rng = np.random.default_rng(seed)
    options = []
    for _ in range(layers):
        dense_macs = float(rng.integers(50, 200))
        layer = [Option(0, "dense", 0.0, dense_macs, float(rng.uniform(1, 3)))]
        for m in range(1, int(rng.integers(1, 4)) + 1):
            layer.append(
                Option(
                    m,
                    "sum",
                    float(rng.uniform(0, 1)) / m,
                    dense_macs * m / 5,
                    float(rng.uniform(0.2, 4)),
                )
            )
        options.append(layer)
    return options


def original_costs(options):
    """MACs and seconds of the all-dense choice, the fixed part included."""
    macs = FIXED_MACS + sum(layer[0].macs for layer in options)
    return macs, FIXED_SECONDS + sum(layer[0].seconds for layer in options)


def solved_if_feasible(options, budget: Budget, feasible: list):
    """choose_options' answer, or None after checking it refuses when nothing is feasible."""
    if not feasible:
        with pytest.raises(UnreachableTargetError):
            choose_options(options, FIXED_MACS, FIXED_SECONDS, budget)
        return None
    return choose_options(options, FIXED_MACS, FIXED_SECONDS, budget)


def combinations(options, budget: Budget):
    """(error, choice) of every combination within the budget, MACs rounded up to the
    solver's steps as it does."""
    unit = budget.macs / MAC_STEPS
    free = MAC_STEPS - np.ceil(FIXED_MACS / unit)
    for choice in itertools.product(*options):
        steps = sum(np.ceil(o.macs / unit) for o in choice)
        seconds = FIXED_SECONDS + sum(o.seconds for o in choice)
        if steps <= free and seconds <= budget.seconds:
            yield sum(o.error for o in choice), choice


@PROPERTY
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 4), share=st.floats(0.3, 1.0))
def test_without_a_binding_time_budget_the_choice_is_the_least_error_one(seed, layers, share):
    options = random_options(seed, layers)
    budget = Budget(seconds=1e9, macs=original_costs(options)[0] * share)
    feasible = list(combinations(options, budget))
    chosen = solved_if_feasible(options, budget, feasible)
    if chosen is None:
        return
    best = min(error for error, _ in feasible)
    assert sum(o.error for o in chosen) == pytest.approx(best, abs=1e-12)


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    layers=st.integers(1, 4),
    share=st.floats(0.3, 1.0),
    speed=st.floats(1.0, 3.0),
)
def test_a_time_budget_is_met_whenever_any_combination_meets_it(seed, layers, share, speed):
    options = random_options(seed, layers)
    dense_macs, dense_seconds = original_costs(options)
    budget = Budget(seconds=dense_seconds / speed, macs=dense_macs * share)
    feasible = list(combinations(options, budget))
    chosen = solved_if_feasible(options, budget, feasible)
    if chosen is None:
        return
    assert all(o in layer for layer, o in zip(options, chosen))
    assert FIXED_SECONDS + sum(o.seconds for o in chosen) <= budget.seconds
    assert FIXED_MACS + sum(o.macs for o in chosen) <= budget.macs
    worst = max(error for error, _ in feasible)
    assert sum(o.error for o in chosen) <= worst + 1e-12


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    layers=st.integers(1, 4),
    share=st.floats(0.2, 0.9),
    ratio=st.floats(0.5, 1.2),
)
def test_a_ratio_goal_makes_the_speed_up_follow_the_mac_reduction(seed, layers, share, ratio):
    options = random_options(seed, layers)
    original_macs, original_seconds = original_costs(options)
    budget = Budget(original_macs * share, None, ratio, original_macs, original_seconds)

    def speed_and_reduction(choice):
        seconds = FIXED_SECONDS + sum(o.seconds for o in choice)
        return original_seconds / seconds, original_macs / (
            FIXED_MACS + sum(o.macs for o in choice)
        )

    within_macs = combinations(options, Budget(original_macs * share, 1e9))
    meeting = [
        choice
        for _, choice in within_macs
        if speed_and_reduction(choice)[0] >= ratio * speed_and_reduction(choice)[1]
    ]
    chosen = solved_if_feasible(options, budget, meeting)
    if chosen is None:
        return
    speedup, reduction = speed_and_reduction(chosen)
    assert speedup >= ratio * reduction * (1 - 1e-12) and reduction >= 1 / share * (1 - 1e-12)


def test_a_speed_goal_is_a_time_budget_or_a_ratio_not_both():
    with pytest.raises(GdwsError, match="a time budget or a speed-up"):
        choose_options([[Option(0, "dense", 0.0, 1.0, 1.0)]], 0.0, 0.0, Budget(seconds=1, ratio=1))


def test_a_time_budget_alone_buys_the_cheapest_error_per_second():
    fast_but_lossy = Option(1, "sum", 1.0, 10.0, 1.0)
    slow_but_exact = Option(0, "dense", 0.0, 90.0, 3.0)
    mild = Option(2, "sum", 0.1, 20.0, 1.5)
    options = [[slow_but_exact, fast_but_lossy, mild]] * 2
    chosen = choose_options(options, 0.0, 0.0, Budget(seconds=3.0))
    assert chosen == [mild, mild]  # 3.0 s: both mild (0.2) beats dense + lossy (1.0)
    assert choose_options(options, 0.0, 0.0, Budget(seconds=6.0)) == [slow_but_exact] * 2
    with pytest.raises(SlowerThanBudgetError) as missed:
        choose_options(options, 0.0, 0.0, Budget(seconds=1.5))
    assert missed.value.fastest == [fast_but_lossy] * 2


def test_a_layer_without_options_is_an_error():
    with pytest.raises(GdwsError, match="at least one option"):
        choose_options([[]], 0.0, 0.0, Budget(seconds=1.0))
