"""Convert for a speed target: `--speedup S`, with or without a MAC-reduction target.

A MAC allocation spends MACs, not time: on a CPU at batch 32 a depthwise conv is memory
bound, so a layer's GDWS form with several kernels per channel can take longer than its
dense conv while one kernel per channel is 4-8x faster (README, issue 6). Here each layer
offers dense or m kernels on every channel (gdws.uniform: no Gather, no zero kernels), in
the faster of the pad and sum forms, each timed inside the whole model (context_timing).
time_allocation picks one per layer for the least error within the time budget (the
original's time / S) and the MAC budget. The converted model is then timed against the
original; where it falls short of S (in-context times add up only roughly), the time
budget is tightened by the shortfall and the choice made again, up to REFINEMENTS times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from gdws_deploy.context_timing import FIXED, ContextTimer, Form, saves_macs
from gdws_deploy.cost_model import CostModel
from gdws_deploy.gdws import USES_ALPHAS, ChannelSpectra, GdwsFactors, LossCurve, uniform
from gdws_deploy.graph import ConvLayer, TensorType
from gdws_deploy.time_allocation import Budget, Option, choose_options
from gdws_deploy.tuning import Choice, never_slower

# Kernels per channel offered to every layer (a 3x3 kernel has at most 9).
PER_CHANNEL = (1, 2, 3, 4, 6)
# The forms timed for m > 1 (m = 1 is one plain depthwise conv in either).
MULTI_SLICE_FORMS = ("sum", "pad")
REFINEMENTS = 2


@dataclass(frozen=True)
class SpeedPlan:
    """What convert_for_speedup chose: the model, its factors and forms, the measured
    whole-model speed-up and what the in-context times predicted."""

    model: onnx.ModelProto
    chosen: List[Tuple[ConvLayer, GdwsFactors]]
    forms: Dict[str, Choice]
    measured: float
    predicted: float


def convert_for_speedup(
    model: onnx.ModelProto,
    types: Mapping[str, TensorType],
    layers: Sequence[ConvLayer],
    spectra: Mapping[str, ChannelSpectra],
    costs: CostModel,
    *,
    speedup: float,
    mac_budget: Optional[float],
    fixed_macs: float,
    rule: str,
    alphas: Mapping[str, np.ndarray],
    curves: Mapping[str, LossCurve],
) -> SpeedPlan:
    """The least-error conversion at least `speedup` times faster on `costs`' backend (as
    near as REFINEMENTS allow), within `mac_budget` MACs when given."""
    timer = ContextTimer(costs.backend, costs.batch, model, types, layers, spectra, costs.cache)
    dense = timer.seconds(Form("dense"))
    original = dense[FIXED] + sum(dense[layer.name] for layer in layers)
    options = [
        layer_options(layer, spectra[layer.name], timer, dense[layer.name], rule, alphas, curves)
        for layer in layers
    ]
    target, plan = speedup, None
    for _ in range(REFINEMENTS + 1):
        budget = Budget(seconds=original / target, macs=mac_budget)
        picks = choose_options(options, fixed_macs, dense[FIXED], budget)
        predicted = original / (dense[FIXED] + sum(pick.seconds for pick in picks))
        lowered = _lower(model, types, layers, spectra, costs, picks, dense, alphas, rule)
        plan = SpeedPlan(*lowered, predicted=predicted)
        if plan.measured >= speedup:
            break
        target *= speedup / plan.measured
    return plan


def layer_options(
    layer: ConvLayer,
    spectra: ChannelSpectra,
    timer: ContextTimer,
    dense_seconds: float,
    rule: str,
    alphas: Mapping[str, np.ndarray],
    curves: Mapping[str, LossCurve],
) -> List[Option]:
    """Dense and each m of PER_CHANNEL that saves MACs, in its fastest measured form."""
    options = [Option(0, "dense", 0.0, float(layer.macs), dense_seconds)]
    out_channels, in_channels, kh, kw = layer.weight_shape
    for m in PER_CHANNEL:
        if m > spectra.rank or not saves_macs(layer, m):
            continue
        forms = MULTI_SLICE_FORMS if m > 1 else MULTI_SLICE_FORMS[:1]
        seconds = {form: timer.seconds(Form(form, m))[layer.name] for form in forms}
        fastest = min(seconds, key=seconds.get)
        macs = float(m * in_channels * (kh * kw + out_channels) * layer.pixels)
        error = option_error(rule, spectra, m, alphas.get(layer.name), curves.get(layer.name))
        options.append(Option(m, fastest, error, macs, seconds[fastest]))
    return options


def option_error(
    rule: str,
    spectra: ChannelSpectra,
    per_channel: int,
    alpha: Optional[np.ndarray],
    curve: Optional[LossCurve],
) -> float:
    """The error of m kernels on every channel on the scale `rule` compares layers by.

    measured: the layer's loss curve at m*C kernels (its counts follow the energy keep
    order, not m per channel: the nearest measured figure, as the curve is the only
    cross-layer scale it has); relative: the dropped share of the layer's energy; the
    alpha rules: alpha-weighted dropped energy; energy: dropped energy.
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
    model: onnx.ModelProto,
    types: Mapping[str, TensorType],
    layers: Sequence[ConvLayer],
    spectra: Mapping[str, ChannelSpectra],
    costs: CostModel,
    picks: Sequence[Option],
    dense: Mapping[str, float],
    alphas: Mapping[str, np.ndarray],
    rule: str,
) -> Tuple[onnx.ModelProto, List[Tuple[ConvLayer, GdwsFactors]], Dict[str, Choice], float]:
    """Lower the picked options and time the result against the original: the model, its
    factors and forms, and the measured speed-up."""
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
    converted, forms, measured = never_slower(model, chosen, types, forms, costs)
    return converted, chosen, forms, measured
