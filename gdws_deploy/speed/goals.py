"""Convert for a speed goal: `--speedup S` (with or without a MAC-reduction target), or
`--speed-ratio E` with one (a speed-up at least E times the MAC reduction reached).

A MAC allocation spends MACs, not time: on a CPU at batch 32 a depthwise conv is memory
bound, so a layer's GDWS form with several kernels per channel can take longer than its
dense conv while one kernel per channel is 4-8x faster (README, issue 6). Here each layer
offers dense or m kernels on every channel (gdws.uniform: no Gather, no zero kernels), in
the faster of the pad and sum forms, each timed inside the whole model (context_timing).
time_allocation picks one per layer for the least error within the speed goal and the MAC
budget, aiming AIM above the goal. The converted model is then timed against the original;
where it does not clear the goal by ACCEPT (in-context times add up only roughly, and
whole-model timings vary), the aim is raised by the shortfall and the choice made again,
up to REFINEMENTS times; the plan measured best against its goal is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np
import onnx

from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer
from gdws_deploy.passes.gdws.allocation import USES_ALPHAS, LossCurve, UnreachableTargetError
from gdws_deploy.passes.gdws.decompose import (
    UNIFORM_PER_CHANNEL,
    ChannelSpectra,
    GdwsFactors,
    uniform,
)
from gdws_deploy.speed.context_timing import (
    FIXED,
    ContextTimer,
    OptionForm,
    saves_macs,
    uniform_macs,
)
from gdws_deploy.speed.cost_model import CostModel
from gdws_deploy.speed.time_allocation import Budget, Option, SlowerThanBudgetError, choose_options
from gdws_deploy.speed.tuning import Choice, lower_model, never_slower

Plan = TypeVar("Plan")
# The forms of each layer's options: m > 1 in pad and sum (m = 1 is one plain depthwise
# conv in either).
OPTION_FORMS = tuple(
    OptionForm(lowering, m)
    for m in UNIFORM_PER_CHANNEL
    for lowering in (("sum", "pad") if m > 1 else ("sum",))
)
REFINEMENTS = 3
# What the solver asks over the goal, and how far above it a measured plan must be:
# whole-model timings here vary by 5-10 % run to run, so a plan that clears the goal by
# a hair misses it about half the time when timed again.
AIM = 1.1
ACCEPT = 1.05


@dataclass(frozen=True)
class SpeedGoal:
    """At least `speedup` times faster, or a speed-up at least `ratio` times the MAC
    reduction (one of the two), on the tune backend."""

    speedup: Optional[float] = None
    ratio: Optional[float] = None

    def wanted(self, reduction: float) -> float:
        """The speed-up this goal asks of a conversion with this MAC reduction (never
        below 1: a converted model is never slower than the original)."""
        return self.speedup if self.speedup is not None else max(self.ratio * reduction, 1.0)

    @property
    def closest(self) -> str:
        """What the choice nearest this goal is."""
        return "fastest" if self.speedup is not None else "most efficient"

    def describe(self) -> str:
        if self.speedup is not None:
            return f"{self.speedup:g}x faster"
        return f"a speed-up {self.ratio:g}x its MAC reduction"

    def budget(
        self, aim: float, mac_budget: Optional[float], original: Tuple[float, float]
    ) -> Budget:
        """The solver's budget with the goal asked `aim` times over."""
        macs, seconds = original
        if self.speedup is not None:
            return Budget(macs=mac_budget, seconds=seconds / (self.speedup * aim))
        return Budget(mac_budget, None, self.ratio * aim, macs, seconds)


class SpeedGoalOutOfReachError(UnreachableTargetError):
    """Even the choice closest to the goal misses it, by the layer times measured: that
    choice is `speedup` times faster at `reduction` times fewer MACs."""

    def __init__(self, message: str, speedup: float, reduction: float) -> None:
        super().__init__(message)
        self.speedup, self.reduction = speedup, reduction


@dataclass(frozen=True)
class SpeedPlan:
    """What convert_for_speed chose: the model, its factors and forms, the measured
    whole-model speed-up."""

    model: onnx.ModelProto
    chosen: List[Tuple[ConvLayer, GdwsFactors]]
    forms: Dict[str, Choice]
    measured: float


def convert_for_speed(
    analyzed: AnalyzedModel,
    layers: Sequence[ConvLayer],
    spectra: Mapping[str, ChannelSpectra],
    costs: CostModel,
    goal: SpeedGoal,
    *,
    mac_budget: Optional[float],
    rule: str,
    alphas: Mapping[str, np.ndarray],
    curves: Mapping[str, LossCurve],
) -> SpeedPlan:
    """The least-error conversion of `layers` meeting `goal` on `costs`' backend (as near
    as REFINEMENTS allow), within `mac_budget` MACs when given."""
    fixed_macs = analyzed.total_macs - sum(layer.macs for layer in layers)
    timer = ContextTimer(costs.backend, costs.batch, analyzed, layers, spectra, costs.cache)
    timer.measure([OptionForm("dense"), *OPTION_FORMS])
    dense = timer.seconds(OptionForm("dense"))
    original_seconds = dense[FIXED] + sum(dense[layer.name] for layer in layers)
    original = (fixed_macs + sum(layer.macs for layer in layers), original_seconds)
    options = [
        layer_options(layer, spectra[layer.name], timer, dense[layer.name], rule, alphas, curves)
        for layer in layers
    ]

    def attempt(aim: float) -> Tuple[float, SpeedPlan]:
        budget = goal.budget(aim, mac_budget, original)
        picks = choose_options(options, fixed_macs, dense[FIXED], budget)
        reduction = _predicted(picks, fixed_macs, dense[FIXED], original)[1]
        plan = _lower(analyzed, layers, spectra, costs, picks, dense, alphas, rule)
        return plan.measured / goal.wanted(reduction), plan

    try:
        plan = refine(attempt)
    except SlowerThanBudgetError as error:
        speedup, reduction = _predicted(error.fastest, fixed_macs, dense[FIXED], original)
        raise SpeedGoalOutOfReachError(
            f"cannot reach {goal.describe()} on {costs.describe()}"
            + (" within the MAC budget" if mac_budget is not None else "")
            + f": the {goal.closest} choice is {speedup:.2f}x faster at {reduction:.2f}x "
            "fewer MACs by the layer times measured",
            speedup,
            reduction,
        ) from error
    if plan.measured >= 1.0:
        return plan
    # measured slower after all: layers go back to dense, MAC target or not
    converted, forms, measured = never_slower(analyzed, plan.chosen, plan.forms, costs)
    return SpeedPlan(converted, plan.chosen, forms, measured)


def refine(attempt: Callable[[float], Tuple[float, Plan]]) -> Plan:
    """The plan of attempts at rising aims that cleared its goal best.

    attempt(aim) plans for the goal asked `aim` times over and returns how many times over
    the plan measured (and the plan); it raises SlowerThanBudgetError when the aim is out of
    reach. Starts at AIM (at the goal itself where AIM is out of reach), stops at the first
    plan measured ACCEPT over, else raises the aim by the shortfall, REFINEMENTS times.
    """
    aim: float = AIM
    plans: List[Tuple[float, Plan]] = []
    while len(plans) <= REFINEMENTS:
        try:
            cleared, plan = attempt(aim)
        except SlowerThanBudgetError:
            if plans:  # a raised aim out of reach: keep the plans so far
                break
            if aim == 1.0:
                raise
            aim = 1.0
            continue
        plans.append((cleared, plan))
        if cleared >= ACCEPT:
            break
        aim *= AIM / cleared
    return max(plans, key=lambda scored: scored[0])[1]


def _predicted(
    picks: Sequence[Option], fixed_macs: float, fixed_seconds: float, original: Tuple[float, float]
) -> Tuple[float, float]:
    """Speed-up and MAC reduction of `picks` by their in-context times and MACs."""
    macs, seconds = original
    after_seconds = fixed_seconds + sum(pick.seconds for pick in picks)
    after_macs = fixed_macs + sum(pick.macs for pick in picks)
    return seconds / after_seconds, macs / after_macs


def layer_options(
    layer: ConvLayer,
    spectra: ChannelSpectra,
    timer: ContextTimer,
    dense_seconds: float,
    rule: str,
    alphas: Mapping[str, np.ndarray],
    curves: Mapping[str, LossCurve],
) -> List[Option]:
    """Dense and each m of UNIFORM_PER_CHANNEL that saves MACs, in its fastest measured
    form."""
    options = [Option(0, "dense", 0.0, float(layer.macs), dense_seconds)]
    for m in UNIFORM_PER_CHANNEL:
        if m > spectra.rank or not saves_macs(layer, m):
            continue
        seconds = {
            form.lowering: timer.seconds(form)[layer.name]
            for form in OPTION_FORMS
            if form.per_channel == m
        }
        fastest = min(seconds, key=seconds.get)
        error = option_error(rule, spectra, m, alphas.get(layer.name), curves.get(layer.name))
        options.append(Option(m, fastest, error, float(uniform_macs(layer, m)), seconds[fastest]))
    return options


def option_error(
    rule: str,
    spectra: ChannelSpectra,
    per_channel: int,
    alpha: Optional[np.ndarray],
    curve: Optional[LossCurve],
) -> float:
    """The error of m kernels on every channel on the scale `rule` compares layers by.

    measured: the layer's measured loss at m kernels on every channel (the curve
    sensitivity.measure_loss_curves(per_channel=True) measures at m*C kernels);
    relative: the dropped share of the layer's energy; the alpha rules: alpha-weighted
    dropped energy; energy: dropped energy.
    """
    if rule == "measured":
        counts = np.append(curve.counts, spectra.s.size)
        losses = np.append(np.maximum(curve.losses, 0.0), 0.0)
        return float(np.interp(per_channel * spectra.in_channels, counts, losses))
    dropped = spectra.dropped_energy(per_channel, alpha if rule in USES_ALPHAS else None)
    if rule == "relative":
        return dropped / max(spectra.total_energy, np.finfo(float).tiny)
    return dropped


def _lower(
    analyzed: AnalyzedModel,
    layers: Sequence[ConvLayer],
    spectra: Mapping[str, ChannelSpectra],
    costs: CostModel,
    picks: Sequence[Option],
    dense: Mapping[str, float],
    alphas: Mapping[str, np.ndarray],
    rule: str,
) -> SpeedPlan:
    """Lower the picked options and time the result against the original."""
    weights = alphas if rule in USES_ALPHAS else {}
    chosen, forms = [], {}
    for layer, pick in zip(layers, picks):
        if pick.per_channel == 0:
            forms[layer.name] = Choice("dense", reason="dense within the time budget")
            continue
        factors = uniform(spectra[layer.name], pick.per_channel, weights.get(layer.name))
        chosen.append((layer, factors))
        seconds = {"dense": dense[layer.name], pick.lowering: pick.seconds}
        forms[layer.name] = Choice(pick.lowering, seconds)
    converted = lower_model(analyzed, chosen, forms, aligned=True)
    before, after = costs.compare(analyzed.model, converted)
    return SpeedPlan(converted, chosen, forms, before / after)
