"""The Python API of `gdws-deploy convert`: an ONNX model in, its compressed form and a
report out.

load -> analyze (check, infer shapes, MACs, Convs) -> the pass selects its layers ->
prepare (GDWS: one batched SVD per layer) -> plan (GDWS: LEGO, MEGO or a whole-model MAC
allocation) -> speed/ picks forms (GDWS lowerings; tuned or by rule) -> write -> verify ->
parity -> ConvertReport.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import onnx

from gdws_deploy.atomic import check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir import graph as onnx_graph
from gdws_deploy.ir.analyze import AnalyzedModel, analyze
from gdws_deploy.ir.size import weight_bits
from gdws_deploy.options import SPEED_GOALS, TARGETS, ConvertOptions
from gdws_deploy.passes.base import CompressionPass, LayerOption, Progress, Stage
from gdws_deploy.passes.gdws.compression import GdwsPass, layer_curves, option
from gdws_deploy.passes.int8 import QUANTIZE_ONLY
from gdws_deploy.passes.registry import pass_named

if TYPE_CHECKING:
    from gdws_deploy.passes.int8.quantize import Int8Deviation
    from gdws_deploy.speed.cost_model import CostModel
    from gdws_deploy.speed.goals import SpeedGoal
    from gdws_deploy.speed.tuning import Choice

# At beta = 0 the rewrite is exact up to float rounding: parity beyond this is a failure.
EXACT_PARITY_LIMIT = 1e-4
# Skip reasons an error message lists at most.
_REASONS_SHOWN = 2

ModelSource = Union[str, Path, onnx.ModelProto, onnx_graph.LoadedModel]


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
    reduction or speed-up of 1), so nothing was rewritten by design. method: the pass
    (ConvertOptions.method). size_bits_before, size_bits_after: the models' weight
    storage as ATMC counts it, non-zeros x bits (ir.size.weight_bits; 32 per non-zero of
    a dense float32 model, fewer where k-means shared the values). int8: the model was
    then quantized to INT8 (QDQ); int8_deviation: how far its outputs are from the
    original's in onnxruntime on the calibration samples (None with parity checks off).
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
    method: str = "gdws"
    size_bits_before: Optional[int] = None
    size_bits_after: Optional[int] = None
    int8: bool = False
    int8_deviation: Optional[Int8Deviation] = None

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
    """Rewrite the eligible Convs of a model with a compression pass (GDWS by default).

    options: what to do (a ConvertOptions; see its fields); keyword `changes` amend it, so
    `convert(path, mac_reduction=2)` works as it reads. When no layer is rewritten the
    original model comes back (report.already_met says whether the target asked for
    nothing); when no Conv is eligible at all, GdwsError says why. At beta = 0, parity worse
    than 1e-4 raises. With a MAC-reduction target, layers tuning keeps dense free their share
    for the rest. progress and stage: called as layers are prepared and as each step starts
    (a large model takes seconds). With int8 (method "int8": alone) the result is then
    quantized to INT8 on int8_calibration (passes.int8.quantize).
    """
    opts = _with_int8(ConvertOptions.of(options, **changes))
    target = _target(opts)
    compression = pass_named(opts.method)
    model = _load(model_or_path).model
    if not opts.int8:
        return _rewrite(model, compression, target, opts, progress, stage)
    from gdws_deploy.passes.int8.quantize import check_quantizable

    check_quantizable(model, opts.int8_calibration)  # before the pass, which takes longer
    converted, report = _rewrite(model, compression, target, opts, progress, stage)
    return _quantized(model, converted, report, opts, stage or _quiet)


def _rewrite(
    model: onnx.ModelProto,
    compression: CompressionPass,
    target: str,
    opts: ConvertOptions,
    progress: Optional[Progress],
    stage: Optional[Stage],
) -> Tuple[onnx.ModelProto, ConvertReport]:
    """The pass's part of convert(): analyze, select, plan, write, verify, parity."""
    from gdws_deploy.speed import tuning

    costs = tuning.cost_model_for(opts.lowering, opts.tune, opts.tune_batch, opts.tune_cache, model)
    goal = None
    if opts.has_speed_goal:
        if costs is None:
            raise GdwsError("a speed goal is measured: give a backend to tune on too")
        from gdws_deploy.speed.goals import SpeedGoal

        goal = SpeedGoal(opts.speedup, opts.speed_ratio)
    if not isinstance(compression, GdwsPass) and (costs is not None or opts.lowering != "auto"):
        raise GdwsError(
            f"method {compression.name!r} has no lowerings: leave lowering and tune out"
        )
    analyzed = compression.select(analyze(model, opts.all_layers, opts.include, opts.exclude))
    size = weight_bits(model)
    report = functools.partial(
        ConvertReport,
        target=target,
        method=compression.name,
        macs_before=analyzed.total_macs,
        size_bits_before=size,
        lowering=opts.lowering,
        tuned=costs and costs.describe(),
    )
    if _already_met(opts.mac_reduction, goal):
        rows = [
            _row(compression, layer, None, None, "target already met") for layer in analyzed.convs
        ]
        whole = analyzed.total_macs
        met = report(layers=tuple(rows), macs_after=whole, size_bits_after=size, already_met=True)
        return model, met
    if not analyzed.eligible:
        raise compression.nothing_eligible(analyzed.convs, opts.include)
    opts = compression.prepare(analyzed, opts, progress=progress, stage=stage)
    aimed = opts.mac_reduction is not None or goal is not None
    say = stage or _quiet
    say("rewriting" if costs is None else f"timing forms on {costs.describe()} and rewriting")
    if isinstance(compression, GdwsPass):  # speed/ knows the GDWS lowerings only
        converted, chosen, forms, measured = _gdws_forms(compression, analyzed, opts, costs, goal)
    else:
        chosen = compression.plan(analyzed, analyzed.eligible, opts)
        converted, forms, measured = compression.write(analyzed, chosen), {}, None
    if costs is not None:
        costs.cache.save()
    dense = _left_dense(target, aimed, goal is not None)
    rows = [
        _row(compression, layer, chosen.get(layer.index), forms.get(layer.name), dense)
        for layer in analyzed.convs
    ]
    report = report(
        layers=tuple(rows),
        macs_after=analyzed.total_macs - sum(row.macs_before - row.macs_after for row in rows),
        allocation=opts.allocation if aimed else None,
        measured_speedup=measured,
        size_bits_after=size if converted is model else weight_bits(converted),
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
    if opts.check_parity:
        say("checking parity in onnxruntime")
        report = with_parity(report, model, converted, exact=opts.beta == 0)
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
    when it already meets the target (report.already_met); quantized to INT8 when asked
    (report.int8). Returns the report and whether `output` holds a rewritten model.
    GdwsError, nothing written, when no Conv could move toward the target. The output path
    is checked before any work; the input is never modified.
    """
    opts = ConvertOptions.of(options, **changes)
    _target(_with_int8(opts))
    check_output_path(output, source)
    say = stage or _quiet
    say(f"loading {source}")
    loaded = onnx_graph.load_model(source)
    model, report = convert(loaded, opts, progress=progress, stage=stage)
    if not (report.converted or report.already_met or report.method == QUANTIZE_ONLY):
        raise _nothing_rewritten(report)
    say(f"saving {output}")
    onnx_graph.save_model(model, output, like=loaded)
    return report, bool(report.converted)


def _quiet(text: str) -> None:
    """A stage callback that shows nothing."""


def _target(opts: ConvertOptions) -> str:
    """The target as a report names it, checked (INT8 alone has none)."""
    return QUANTIZE_ONLY if opts.method == QUANTIZE_ONLY else opts.describe_target()


def _with_int8(opts: ConvertOptions) -> ConvertOptions:
    """`opts` with int8 on where the method is INT8 alone (every Conv selected: it rewrites
    none); GdwsError for a target given to INT8 alone, INT8 without calibration samples,
    or samples without INT8."""
    if opts.method == QUANTIZE_ONLY:
        given = [name for name in (*TARGETS, *SPEED_GOALS) if getattr(opts, name) is not None]
        if given:
            raise GdwsError(f"method int8 quantizes only: it takes no target (got {given[0]})")
        opts = ConvertOptions.of(opts, int8=True, all_layers=True)
    if opts.int8 and opts.int8_calibration is None:
        raise GdwsError("INT8 quantization needs calibration samples of the model's input")
    if not opts.int8 and opts.int8_calibration is not None:
        raise GdwsError("calibration samples serve INT8 quantization: ask for int8 too")
    return opts


def _quantized(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    report: ConvertReport,
    opts: ConvertOptions,
    say: Stage,
) -> Tuple[onnx.ModelProto, ConvertReport]:
    """`converted` quantized to INT8 on the options' samples; the report says so and, with
    parity checks on, how far the INT8 model's outputs are from `original`'s."""
    from gdws_deploy.passes.int8.quantize import int8_deviation, quantize

    say(f"calibrating on {len(opts.int8_calibration)} samples and quantizing to INT8")
    quantized = quantize(converted, opts.int8_calibration)
    onnx_graph.verify(quantized)
    deviation = None
    if opts.check_parity:
        say("measuring the INT8 model against the original in onnxruntime")
        deviation = int8_deviation(original, quantized, opts.int8_calibration)
    size = weight_bits(quantized)
    return quantized, replace(report, int8=True, int8_deviation=deviation, size_bits_after=size)


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


def _gdws_forms(
    gdws: GdwsPass,
    analyzed: AnalyzedModel,
    opts: ConvertOptions,
    costs: Optional[CostModel],
    goal: Optional[SpeedGoal],
) -> Tuple[onnx.ModelProto, Dict[int, LayerOption], Dict[str, Choice], Optional[float]]:
    """GDWS factors of the eligible layers in the forms speed/ chooses: the model, the
    options by node index (their forms final), forms by Conv name, the measured speed-up."""
    from gdws_deploy.speed import tuning

    layers = analyzed.eligible
    if goal is not None:
        from gdws_deploy.speed.goals import convert_for_speed

        mac_reduction = opts.mac_reduction
        measured_curves = opts.allocation == "measured"
        curves = layer_curves(opts.loss_curves, layers) if measured_curves else []
        plan = convert_for_speed(
            analyzed,
            layers,
            gdws.spectra(layers, opts),
            costs,
            goal,
            mac_budget=None if mac_reduction is None else analyzed.total_macs / mac_reduction,
            rule=opts.allocation,
            alphas=opts.alphas or {},
            curves=dict(zip((layer.name for layer in layers), curves)),
        )
        converted, pairs, forms, measured = plan.model, plan.chosen, plan.forms, plan.measured
    else:
        planned, forms = tuning.plan_forms(
            analyzed,
            layers,
            functools.partial(gdws.plan, analyzed, options=opts),
            opts.lowering,
            costs,
        )
        pairs = [
            (layer, planned[layer.index].factors) for layer in layers if layer.index in planned
        ]
        measured = None
        if costs is not None and pairs:
            converted, forms, measured = tuning.never_slower(analyzed, pairs, forms, costs)
        else:
            converted = tuning.lower_model(analyzed, pairs, forms)
    chosen = {layer.index: option(layer, f, forms[layer.name].lowering) for layer, f in pairs}
    return converted, chosen, forms, measured


def _row(
    compression: CompressionPass,
    layer: onnx_graph.ConvLayer,
    chosen: Optional[LayerOption],
    form: Optional[Choice],
    left_dense: str,
) -> LayerReport:
    """The layer's report row; left_dense: why an eligible layer without an option is dense."""
    speedup = form.speedup if form else None
    lowering = form.lowering if form else (chosen.form or None) if chosen else None
    if chosen is not None and lowering != "dense":
        return LayerReport(
            layer.name,
            layer.weight_shape,
            layer.macs,
            chosen.macs,
            chosen.size,
            chosen.error,
            lowering=lowering,
            speedup=speedup,
        )
    reason = layer.skipped or compression.cannot_shrink(layer) or left_dense
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


def with_parity(
    report: ConvertReport, original: onnx.ModelProto, converted: onnx.ModelProto, exact: bool
) -> ConvertReport:
    """The report with the converted model's deviation from the original in onnxruntime;
    `exact` (beta = 0) makes a deviation beyond EXACT_PARITY_LIMIT an error."""
    from gdws_deploy.ir.parity import max_relative_deviation

    deviation = max_relative_deviation(original, converted)
    if exact and not deviation <= EXACT_PARITY_LIMIT:
        raise GdwsError(
            f"parity check failed: at beta=0 the converted model deviates by {deviation:.3g} "
            f"(relative), more than {EXACT_PARITY_LIMIT:g}; --no-parity skips the check"
        )
    return replace(report, parity=deviation)
