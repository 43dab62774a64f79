"""The Python API of `gdws-deploy convert`: an ONNX model in, its GDWS form and a report out.

load -> check + infer shapes -> find eligible Convs -> one batched SVD per layer ->
LEGO (beta), MEGO (budget) or a whole-model MAC allocation (gdws.ALLOCATIONS) -> rewrite
-> parity check.
"""

from __future__ import annotations

import fnmatch
import functools
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import onnx

from gdws_deploy.atomic import check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir import graph as onnx_graph
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.passes.gdws.allocation import (
    USES_ALPHAS,
    LayerCost,
    LossCurve,
    allocate,
    resolve_allocation,
)
from gdws_deploy.passes.gdws.decompose import ChannelSpectra, GdwsFactors, SpectraCache, lego, mego
from gdws_deploy.pipeline.options import AlphaSource, ConvertOptions

if TYPE_CHECKING:
    from gdws_deploy.speed.cost_model import CostModel
    from gdws_deploy.speed.goals import SpeedGoal
    from gdws_deploy.speed.tuning import Choice

# At beta = 0 the rewrite is exact up to float rounding: parity beyond this is a failure.
EXACT_PARITY_LIMIT = 1e-4
# Why an eligible layer stayed dense when even one kernel costs as the dense conv.
NO_GAIN = "GDWS form would not reduce its MACs"
# Conv names and skip reasons an error message lists at most.
_NAMES_SHOWN = 5
_REASONS_SHOWN = 2
# graph.find_convs' skip reasons: Convs GDWS has nothing to factor in, Convs whose weights
# are not constants.
_STRUCTURAL = ("grouped conv", "1x1 kernel")
_RUN_TIME_WEIGHTS = ("weight is a graph input", "weight computed at run time", "quantized weight")

ModelSource = Union[str, Path, onnx.ModelProto, onnx_graph.LoadedModel]
# progress(done, total, layer name), called after each layer is factored.
Progress = Callable[[int, int, str], None]
# stage(what starts now): loading, factoring N Convs, rewriting, checking parity, saving.
Stage = Callable[[str], None]


@dataclass(frozen=True)
class LayerReport:
    """One Conv: rewritten (kernels G, weighted error) or left alone (skipped says why).

    lowering: the form it got (gather, pad, fold; dense when tuning kept it);
    speedup: measured dense time / its form's time, when tuned.
    """

    name: str
    weight_shape: Tuple[int, ...]
    macs_before: int
    macs_after: int
    kernels: Optional[int] = None
    error: Optional[float] = None
    skipped: Optional[str] = None
    lowering: Optional[str] = None
    speedup: Optional[float] = None


@dataclass(frozen=True)
class ConvertReport:
    """What convert did: per-Conv rows and whole-model MACs at batch 1.

    tuned: the backend and batch the lowerings were measured on; measured_speedup: the
    whole converted model against the original there. notes: what else changed, one line
    each (an upgraded IR version). already_met: the original meets the target (a MAC
    reduction or speed-up of 1), so nothing was rewritten by design.
    """

    target: str
    layers: Tuple[LayerReport, ...]
    macs_before: int
    macs_after: int
    parity: Optional[float] = None
    allocation: Optional[str] = None
    lowering: str = "auto"
    tuned: Optional[str] = None
    measured_speedup: Optional[float] = None
    notes: Tuple[str, ...] = ()
    already_met: bool = False

    @property
    def converted(self) -> int:
        return sum(layer.kernels is not None for layer in self.layers)

    @property
    def reduction(self) -> float:
        """Achieved MAC reduction of the whole model (before / after)."""
        return self.macs_before / self.macs_after if self.macs_after else 1.0

    def to_dict(self) -> Dict:
        """JSON-ready form, derived figures included."""
        return {
            **asdict(self),
            "layers": [asdict(layer) for layer in self.layers],
            "converted": self.converted,
            "reduction": self.reduction,
        }


def convert(
    model_or_path: ModelSource,
    options: Optional[ConvertOptions] = None,
    *,
    progress: Optional[Progress] = None,
    stage: Optional[Stage] = None,
    **changes: Any,
) -> Tuple[onnx.ModelProto, ConvertReport]:
    """Rewrite the eligible Convs of a model into GDWS form.

    options: what to do (a ConvertOptions; see its fields); keyword `changes` amend it, so
    `convert(path, mac_reduction=2)` works as it reads. When no layer is rewritten the
    original model comes back (report.already_met says whether the target asked for
    nothing); when no Conv is eligible at all, GdwsError says why. At beta = 0, parity worse
    than 1e-4 raises. With a MAC-reduction target, layers tuning keeps dense free their share
    for the rest. progress and stage: called as layers are factored and as each step starts
    (a large model takes seconds).
    """
    from gdws_deploy.speed import tuning

    opts = ConvertOptions.of(options, **changes)
    target = opts.describe_target()
    beta, budget, mac_reduction = opts.beta, opts.budget, opts.mac_reduction
    speedup, speed_ratio, lowering, tune = opts.speedup, opts.speed_ratio, opts.lowering, opts.tune
    tune_batch, tune_cache, alphas, allocation = (
        opts.tune_batch,
        opts.tune_cache,
        opts.alphas,
        opts.allocation,
    )
    all_layers, include, exclude = opts.all_layers, opts.include, opts.exclude
    loss_curves, spectra_cache, check_parity = (
        opts.loss_curves,
        opts.spectra_cache,
        opts.check_parity,
    )
    model = _load(model_or_path).model
    costs = tuning.cost_model_for(lowering, tune, tune_batch, tune_cache, model)
    goal = None
    if speedup is not None or speed_ratio is not None:
        if costs is None:
            raise GdwsError("a speed goal is measured: give a backend to tune on too")
        from gdws_deploy.speed.goals import SpeedGoal

        goal = SpeedGoal(speedup, speed_ratio)
    analyzed = analyze(model, all_layers, include, exclude)
    types, macs, convs, eligible = analyzed.types, analyzed.macs, analyzed.convs, analyzed.eligible
    report = functools.partial(
        ConvertReport,
        target=target,
        macs_before=analyzed.total_macs,
        lowering=lowering,
        tuned=costs and costs.describe(),
    )
    if _already_met(mac_reduction, goal):
        rows = [_row(layer, None, None, "target already met") for layer in convs]
        return model, report(layers=tuple(rows), macs_after=analyzed.total_macs, already_met=True)
    if not eligible:
        raise _nothing_eligible(convs, include)
    weights = _alphas(alphas, eligible)
    aimed = mac_reduction is not None or goal is not None
    rule = _rule(allocation, weights, loss_curves, goal is not None) if aimed else None
    say = stage or _quiet
    cache = spectra_cache if spectra_cache is not None else SpectraCache()
    say(f"factoring {len(eligible)} Conv(s)")
    spectra = dict(zip((layer.name for layer in eligible), _spectra(eligible, progress, cache)))
    plan = functools.partial(
        _plan,
        alphas=weights,
        beta=beta,
        budget=budget,
        mac_reduction=mac_reduction,
        total_macs=analyzed.total_macs,
        allocation=rule,
        curves=loss_curves or {},
    )
    measured = None
    say("rewriting" if costs is None else f"timing forms on {costs.describe()} and rewriting")
    if goal is not None:
        converted, chosen, forms, measured = _for_speed(
            model,
            types,
            eligible,
            spectra,
            costs,
            goal,
            mac_reduction,
            macs,
            rule,
            weights,
            loss_curves or {},
        )
        factors = {layer.index: f for layer, f in chosen}
    else:
        factors, forms = tuning.plan_forms(model, types, eligible, spectra, plan, lowering, costs)
        chosen = [(layer, factors[layer.index]) for layer in eligible if layer.index in factors]
        if costs is not None and chosen:
            converted, forms, measured = tuning.never_slower(model, chosen, types, forms, costs)
        else:
            converted = tuning.lower_model(model, chosen, types, forms)
    if costs is not None:
        costs.cache.save()
    dense = _left_dense(target, aimed, goal is not None)
    rows = [_row(layer, factors.get(layer.index), forms.get(layer.name), dense) for layer in convs]
    report = report(
        layers=tuple(rows),
        macs_after=analyzed.total_macs - sum(row.macs_before - row.macs_after for row in rows),
        allocation=rule,
        measured_speedup=measured,
    )
    if converted is model:
        return model, report
    if converted.ir_version != model.ir_version:
        note = (
            f"IR version {model.ir_version} -> {converted.ir_version}: the rewrite adds "
            f"initializers, which IR {model.ir_version} must also list as graph inputs"
        )
        report = replace(report, notes=(*report.notes, note))
    onnx_graph.verify(converted)
    if check_parity:
        say("checking parity in onnxruntime")
        report = _with_parity(report, model, converted, exact=beta == 0)
    return converted, report


def convert_file(
    source: Union[str, Path],
    output: Union[str, Path],
    options: Optional[ConvertOptions] = None,
    *,
    progress: Optional[Progress] = None,
    stage: Optional[Stage] = None,
    **changes: Any,
) -> Tuple[ConvertReport, bool]:
    """convert() from file to file, stored as the source was (external data or not).

    `output` is always written when this returns: the GDWS model, or the source unchanged
    when it already meets the target (report.already_met). Returns the report and whether
    `output` holds a rewritten model. GdwsError, nothing written, when no Conv could move
    toward the target. The output path is checked before any work; the input is never
    modified.
    """
    opts = ConvertOptions.of(options, **changes)
    opts.describe_target()
    check_output_path(output, source)
    say = stage or _quiet
    say(f"loading {source}")
    loaded = onnx_graph.load_model(source)
    model, report = convert(loaded, opts, progress=progress, stage=stage)
    if not report.converted and not report.already_met:
        raise _nothing_rewritten(report)
    say(f"saving {output}")
    onnx_graph.save_model(model, output, like=loaded)
    return report, bool(report.converted)


def _quiet(text: str) -> None:
    """A stage callback that shows nothing."""


def _load(source: ModelSource) -> onnx_graph.LoadedModel:
    if isinstance(source, onnx_graph.LoadedModel):
        return source
    if isinstance(source, onnx.ModelProto):
        return onnx_graph.LoadedModel(source)
    if isinstance(source, (str, Path)):
        return onnx_graph.load_model(source)
    raise GdwsError(f"expected an ONNX model or a path, got {type(source).__name__}")


def _already_met(mac_reduction: Optional[float], goal: Optional[SpeedGoal]) -> bool:
    """Whether the original model meets the target as it is: it asks for 1x."""
    if mac_reduction is None and goal is None:
        return False
    return (mac_reduction is None or mac_reduction <= 1) and (goal is None or goal.wanted(1) <= 1)


def _nothing_eligible(convs: Sequence[onnx_graph.ConvLayer], include: Sequence[str]) -> GdwsError:
    """Why no target could rewrite anything, in one line."""
    if not convs:
        return GdwsError("the model has no Conv: nothing for GDWS to do")
    names = [layer.name for layer in convs]
    if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
        shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
        return GdwsError(f"--include matched no Conv (names are: {shown})")
    kinds = Counter(layer.skipped.split(" (")[0] for layer in convs)
    counted = ", ".join(f"{count} x {kind}" for kind, count in kinds.most_common())
    if all(kind.startswith(_STRUCTURAL) for kind in kinds):
        return GdwsError("all Convs are depthwise, grouped or 1x1: nothing for GDWS to do")
    if all(kind.startswith(_RUN_TIME_WEIGHTS) for kind in kinds):
        return GdwsError(f"no Conv has constant weights ({counted}): nothing GDWS can factor")
    hint = "; --all-layers converts the first" if "first conv" in kinds else ""
    return GdwsError(f"no Conv GDWS can rewrite ({counted}){hint}")


def _nothing_rewritten(report: ConvertReport) -> GdwsError:
    """Eligible Convs, none rewritten: the target cannot be moved toward; the commonest
    reasons why."""
    reasons = Counter(row.skipped for row in report.layers).most_common(_REASONS_SHOWN)
    why = "; ".join(f"{count} x {reason}" for reason, count in reasons)
    return GdwsError(f"no Conv was rewritten at {report.target} ({why}): nothing written")


def _left_dense(target: str, aimed: bool, speed_goal: bool) -> str:
    """Why an eligible layer one kernel would shrink got no factors, by the target's kind."""
    if speed_goal:
        return "left dense by the speed plan"
    if aimed:
        return "left dense by the allocation (dense is cheaper than the kernels it was given)"
    return f"the kernels {target} keeps cost no fewer MACs than the dense conv"


def _alphas(source: AlphaSource, layers: Sequence[onnx_graph.ConvLayer]) -> Dict[str, np.ndarray]:
    """Channel weights per eligible layer name; {} without alphas (all ones).

    Keys starting with "__" hold settings of whoever computed them and are ignored.
    """
    if source is None:
        return {}
    table = _read_npz(source) if isinstance(source, (str, Path)) else dict(source)
    weights = {}
    for layer in layers:
        if layer.name not in table:
            raise GdwsError(f"alphas have no entry for Conv {layer.name!r}")
        alpha = np.asarray(table[layer.name], dtype=np.float64)
        channels = layer.weight_shape[1]
        if alpha.shape != (channels,):
            raise GdwsError(
                f"alphas for {layer.name!r} have shape {alpha.shape}, expected ({channels},)"
            )
        weights[layer.name] = alpha
    return weights


def _read_npz(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise GdwsError(f"cannot read alphas from {path}: no such file")
    if not zipfile.is_zipfile(path):  # np.load would try it as .npy, then as a pickle
        raise GdwsError(f"cannot read alphas from {path}: not an npz archive (numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files if not key.startswith("__")}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise GdwsError(f"cannot read alphas from {path}: {error}") from error


def _rule(
    allocation: str,
    alphas: Mapping[str, np.ndarray],
    curves: Optional[Mapping[str, LossCurve]],
    speed_goal: bool,
) -> str:
    """The allocation rule a MAC-reduction target runs; alphas it would ignore are an error."""
    rule = resolve_allocation(allocation, curves is not None, speed_goal)
    if alphas and rule not in USES_ALPHAS:
        raise GdwsError(
            f"allocation {rule!r} does not use alphas; give allocation "
            f"{' or '.join(USES_ALPHAS)} with them, or leave them out"
        )
    return rule


def _spectra(
    layers: Sequence[onnx_graph.ConvLayer], progress: Optional[Progress], cache: SpectraCache
) -> List[ChannelSpectra]:
    """The one batched SVD per layer (from the cache when it has it), reused throughout."""
    spectra = []
    for done, layer in enumerate(layers, start=1):
        spectra.append(cache.get(layer.name, layer.weight))
        if progress is not None:
            progress(done, len(layers), layer.name)
    return spectra


def _plan(
    layers: Sequence[onnx_graph.ConvLayer],
    spectra: Sequence[ChannelSpectra],
    *,
    alphas: Mapping[str, np.ndarray],
    beta: Optional[float],
    budget: Optional[int],
    mac_reduction: Optional[float],
    total_macs: int,
    allocation: Optional[str],
    curves: Mapping[str, LossCurve],
) -> Dict[int, GdwsFactors]:
    """Factors per node index, only for layers whose GDWS form has fewer MACs."""
    if not layers:
        return {}
    alpha = [alphas.get(layer.name) for layer in layers]
    if mac_reduction is not None:
        costs = [_cost(layer) for layer in layers]
        fixed = total_macs - sum(cost.dense_macs for cost in costs)
        layer_curves = _curves(curves, layers) if allocation == "measured" else None
        factors = allocate(allocation, spectra, costs, fixed, mac_reduction, alpha, layer_curves)
    elif beta is not None:
        factors = [lego(s, beta, a) for s, a in zip(spectra, alpha)]
    else:
        factors = [mego(s, budget, a) for s, a in zip(spectra, alpha)]
    return {
        layer.index: f
        for layer, f in zip(layers, factors)
        if f is not None and f.kernels * _cost(layer).kernel_macs < layer.macs
    }


def _for_speed(
    model: onnx.ModelProto,
    types: Mapping[str, onnx_graph.TensorType],
    layers: Sequence[onnx_graph.ConvLayer],
    spectra: Mapping[str, ChannelSpectra],
    costs: CostModel,
    goal: SpeedGoal,
    mac_reduction: Optional[float],
    macs: Mapping[str, int],
    rule: str,
    alphas: Mapping[str, np.ndarray],
    curves: Mapping[str, LossCurve],
) -> Tuple[onnx.ModelProto, list, Dict[str, Choice], float]:
    """speed_target's plan for these layers: model, (layer, factors), forms, measured."""
    from gdws_deploy.speed.goals import convert_for_speed

    total = sum(macs.values())
    names = [layer.name for layer in layers]
    plan = convert_for_speed(
        model,
        types,
        layers,
        spectra,
        costs,
        goal,
        mac_budget=None if mac_reduction is None else total / mac_reduction,
        fixed_macs=total - sum(layer.macs for layer in layers),
        rule=rule,
        alphas=alphas,
        curves=dict(zip(names, _curves(curves, layers))) if rule == "measured" else {},
    )
    return plan.model, plan.chosen, plan.forms, plan.measured


def _curves(
    curves: Mapping[str, LossCurve], layers: Sequence[onnx_graph.ConvLayer]
) -> List[LossCurve]:
    missing = [layer.name for layer in layers if layer.name not in curves]
    if missing:
        raise GdwsError(f"no measured loss curve for Conv {missing[0]!r}")
    return [curves[layer.name] for layer in layers]


def _cost(layer: onnx_graph.ConvLayer) -> LayerCost:
    return LayerCost(kernel_macs=layer.kernel_macs, dense_macs=layer.macs)


def _row(
    layer: onnx_graph.ConvLayer,
    factors: Optional[GdwsFactors],
    form: Optional[Choice],
    left_dense: str,
) -> LayerReport:
    """The layer's report row; left_dense: why an eligible layer without factors is dense."""
    lowering, speedup = (form.lowering, form.speedup) if form else (None, None)
    if factors is not None and lowering != "dense":
        after = factors.kernels * _cost(layer).kernel_macs
        return LayerReport(
            layer.name,
            layer.weight_shape,
            layer.macs,
            after,
            factors.kernels,
            factors.error,
            lowering=lowering,
            speedup=speedup,
        )
    reason = layer.skipped
    if reason is None:
        reason = NO_GAIN if layer.kernel_macs >= layer.macs else left_dense
    if form is not None:
        reason = f"kept dense: {form.reason}"
    return LayerReport(
        layer.name,
        layer.weight_shape,
        layer.macs,
        layer.macs,
        skipped=reason,
        lowering=lowering,
        speedup=speedup,
    )


def _with_parity(
    report: ConvertReport, original: onnx.ModelProto, converted: onnx.ModelProto, exact: bool
) -> ConvertReport:
    from gdws_deploy.ir.parity import max_relative_deviation

    deviation = max_relative_deviation(original, converted)
    if exact and not deviation <= EXACT_PARITY_LIMIT:
        raise GdwsError(
            f"parity check failed: at beta=0 the converted model deviates by {deviation:.3g} "
            f"(relative), more than {EXACT_PARITY_LIMIT:g}; --no-parity skips the check"
        )
    return replace(report, parity=deviation)
