"""Which lowering each GDWS layer gets, and the promise that the result is not slower.

`--lowering auto` decides per layer. Untuned it follows rules that hold on any backend:
fold where the producer chain allows it and adds no work (every channel keeps at most one
kernel, so the producer emits no more channels than before), else the exact (gather)
form. Tuned (`--tune ort`, or any measure.Backend), it asks the cost model (calibrated by
timing single-layer models on that backend at the deployment batch size) for every
candidate form of a layer, dense included, and keeps the fastest, in the aligned forms
it measured (lowering.ALIGNED_LOWERINGS). The whole converted model is then timed
against the original and layers go back to dense, those that gain least first, until it
is faster (at worst: the original model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import onnx
import onnx_graphsurgeon as gs

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer
from gdws_deploy.passes.base import LayerOption
from gdws_deploy.passes.gdws.compression import GdwsPass, option
from gdws_deploy.passes.gdws.decompose import GdwsFactors
from gdws_deploy.passes.gdws.lowering import LOWERINGS, fold_chain
from gdws_deploy.speed.backends import Backend, backend_named
from gdws_deploy.speed.cost_model import CostModel, LayerShape, LoweringForm
from gdws_deploy.speed.tune_cache import TuneCache

STRATEGIES = ("auto", *LOWERINGS)


@dataclass(frozen=True)
class Choice:
    """The form a layer gets; seconds: each candidate's cost-model time (empty untuned)."""

    lowering: str
    seconds: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""

    @property
    def speedup(self) -> Optional[float]:
        """Dense time / the chosen form's time, when tuned."""
        chosen = self.seconds.get(self.lowering)
        dense = self.seconds.get("dense")
        return dense / chosen if chosen and dense else None


def cost_model_for(
    strategy: str,
    tune: Union[str, Backend, None],
    batch: Optional[int],
    cache: Union[str, Path, None],
    model: onnx.ModelProto,
) -> Optional[CostModel]:
    """The cost model convert's tune options ask for (None: untuned), every option checked."""
    if tune is None:
        check_strategy(strategy, tuned=False)
        if batch is not None or cache is not None:
            raise GdwsError(
                "a tune batch or cache needs a backend to tune on: give --tune ort|trt too"
            )
        return None
    check_strategy(strategy, tuned=True)
    backend = tune if isinstance(tune, Backend) else backend_named(tune)
    if batch is None:
        batch = _fixed_batch(model) or 1
    return CostModel(backend, batch, TuneCache(cache))


def plan_forms(
    analyzed: AnalyzedModel,
    layers: Sequence[ConvLayer],
    plan: Callable[[Sequence[ConvLayer]], Dict[int, LayerOption]],
    strategy: str,
    costs: Optional[CostModel],
) -> Tuple[Dict[int, LayerOption], Dict[str, Choice]]:
    """Options (by node index, GDWS factors) and forms (by Conv name) of the layers to
    rewrite.

    `plan` factors a set of layers (GdwsPass.plan). Layers that tuning keeps dense leave
    the set and the rest is planned again, so a whole-model target (MAC reduction) is met
    by the layers that GDWS makes faster; when the rest cannot meet it, the last plan that
    could stays.
    """
    kept: Dict[str, Choice] = {}
    options: Dict[int, LayerOption] = {}
    forms: Dict[str, Choice] = {}
    while True:
        planned = [layer for layer in layers if layer.name not in kept]
        try:
            next_options = plan(planned)
        except GdwsError:
            if not kept:
                raise
            break
        options = next_options
        chosen = [
            (layer, options[layer.index].factors) for layer in planned if layer.index in options
        ]
        forms = choose_forms(analyzed, chosen, strategy, costs)
        slower = {name: c for name, c in forms.items() if c.lowering == "dense"}
        if not slower:
            break
        kept.update(slower)
    return options, {**kept, **forms}


def candidates(factors: GdwsFactors, foldable: bool) -> List[LoweringForm]:
    """The forms worth costing for a layer.

    With at most one kernel per channel, a fold does less work than gather or pad (the
    producer emits only the kept channels, the Gather is gone): it is the one GDWS
    candidate. Otherwise fold would make the producer emit duplicate channels, each as
    costly as a whole producer channel, so it is left out. Equal kernel counts on every
    channel leave gather out: its form is then a channel-multiplier conv computing what
    pad computes with no padding. Sum is pad with one slice unless a channel has more.
    """
    per_channel = factors.kernels_per_channel()
    g, most = factors.kernels, int(per_channel.max())
    if foldable and most == 1:
        return [LoweringForm("dense"), LoweringForm("fold", g, 1)]
    forms = [LoweringForm("dense"), LoweringForm("pad", g, most)]
    if most > 1:
        forms.append(LoweringForm("sum", g, most))
    if int(per_channel.min()) != most:
        forms.append(LoweringForm("gather", g, most))
    return forms


def choose(costs: CostModel, shape: LayerShape, factors: GdwsFactors, foldable: bool) -> Choice:
    """The fastest of the layer's candidate forms, dense included."""
    forms = candidates(factors, foldable)
    costs.calibrate(shape, [form.lowering for form in forms])
    seconds = {form.lowering: costs.seconds(shape, form) for form in forms}
    fastest = min(seconds, key=seconds.get)
    return Choice(fastest, seconds, "GDWS measured slower" if fastest == "dense" else "")


def choose_forms(
    analyzed: AnalyzedModel,
    chosen: Sequence[Tuple[ConvLayer, GdwsFactors]],
    strategy: str,
    costs: Optional[CostModel] = None,
) -> Dict[str, Choice]:
    """The lowering of every layer about to be rewritten, by Conv name."""
    model, types = analyzed.model, analyzed.types
    graph = gs.import_onnx(model)
    forms = {}
    for layer, factors in chosen:
        node = model.graph.node[layer.index]
        foldable = fold_chain(graph, graph.nodes[layer.index]) is not None
        if strategy != "auto":
            lowering = "gather" if strategy == "fold" and not foldable else strategy
            forms[layer.name] = Choice(lowering)
        elif costs is not None:
            forms[layer.name] = choose(costs, LayerShape.of(node, types), factors, foldable)
        else:
            unique = int(factors.kernels_per_channel().max()) == 1
            forms[layer.name] = Choice("fold" if foldable and unique else "gather")
    return forms


def lower_model(
    analyzed: AnalyzedModel,
    chosen: Sequence[Tuple[ConvLayer, GdwsFactors]],
    forms: Mapping[str, Choice],
    aligned: bool = False,
) -> onnx.ModelProto:
    """The model with every layer in its chosen form, written by the GDWS pass (the model
    itself when all stay dense); aligned: in the forms tuning measures."""
    options = {layer.index: option(layer, f, forms[layer.name].lowering) for layer, f in chosen}
    return GdwsPass().write(analyzed, options, aligned=aligned)


def never_slower(
    analyzed: AnalyzedModel,
    chosen: Sequence[Tuple[ConvLayer, GdwsFactors]],
    forms: Dict[str, Choice],
    costs: CostModel,
) -> Tuple[onnx.ModelProto, Dict[str, Choice], float]:
    """Lower, time against the original, and send layers back to dense until faster.

    Layers go back in order of least measured gain, 1, 2, 4, ... at a time. Returns the
    model, the final forms and the measured whole-model speed-up (1.0: the original).
    """
    forms = dict(forms)
    queue = sorted(
        (name for name, choice in forms.items() if choice.lowering != "dense"),
        key=lambda name: forms[name].speedup or 1.0,
    )
    step = 1
    while True:
        converted = lower_model(analyzed, chosen, forms, aligned=True)
        if converted is analyzed.model:
            return converted, forms, 1.0
        before, after = costs.compare(analyzed.model, converted)
        if after < before:
            return converted, forms, before / after
        for name in queue[:step]:
            forms[name] = replace(forms[name], lowering="dense", reason="whole model slower")
        queue, step = queue[step:], step * 2


def check_strategy(strategy: str, tuned: bool) -> None:
    if strategy not in STRATEGIES:
        raise GdwsError(f"lowering must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if tuned and strategy != "auto":
        raise GdwsError(f"tuning chooses lowerings: use it with lowering auto, not {strategy}")


def _fixed_batch(model: onnx.ModelProto) -> Optional[int]:
    """The first input's batch dimension when the model fixes it."""
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else ()
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
