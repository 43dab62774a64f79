"""`gdws-deploy sweep`: the speed/robustness trade-off of one model, measured end to end.

calibrate once (loss curves or alphas, one SVD per layer) -> convert at every target ->
[search the --max-robust-drop point] -> clean and robust accuracy of every model under one
RobustnessCheck -> throughput of every model, all timed interleaved in one run -> JSON,
plot and converted models in one folder.

Everything that can be checked is checked before any work (targets, settings, the model,
its eligible Convs, the output folder), and the original is measured first, so a model
the eval machinery cannot run fails in seconds. The folder is written atomically: every
file goes to a hidden sibling folder first, which becomes --out only when the sweep has
succeeded; a failed or interrupted sweep leaves nothing behind.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from gdws_deploy.atomic import atomic_folder, atomic_open, check_output_folder
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import AnalyzedModel, analyze
from gdws_deploy.ir.graph import LoadedModel, load_model, save_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.gdws.allocation import resolve_allocation
from gdws_deploy.passes.registry import pass_named
from gdws_deploy.pipeline.calibrated import DropNotKeptError, convert_calibrated
from gdws_deploy.pipeline.measure import ModelToMeasure, measure_models
from gdws_deploy.pipeline.operating_point import OperatingPoint, check_max_drop
from gdws_deploy.pipeline.plot import save_sweep_plot
from gdws_deploy.pipeline.results import BenchSettings, MeasuredPoint, SweepResult
from gdws_deploy.robustness.check import RobustnessCheck, with_transfer
from gdws_deploy.robustness.sensitivity import calibrate
from gdws_deploy.speed.tuning import _fixed_batch as fixed_batch
from gdws_deploy.speed.tuning import cost_model_for

DEFAULT_MAC_REDUCTIONS = (1.5, 2.0, 3.0, 4.0)
DEFAULT_BENCH_BATCH = 32
JSON_NAME = "sweep.json"
PLOT_NAME = "sweep.png"
# progress(what is being done now)
Progress = Callable[[str], None]


def run_sweep(
    model: Union[str, Path],
    out_dir: Union[str, Path],
    check: RobustnessCheck,
    *,
    calibration: Optional[RobustnessCheck] = None,
    mac_reductions: Optional[Sequence[float]] = None,
    betas: Optional[Sequence[float]] = None,
    max_robust_drop: Optional[float] = None,
    bench: Optional[BenchSettings] = None,
    convert_options: Optional[ConvertOptions] = None,
    progress: Optional[Progress] = None,
) -> SweepResult:
    """Convert `model` at every target, measure every model, write `out_dir`/sweep.json,
    sweep.png and the converted models.

    check: what the accuracies are measured with; calibration: the data and attacks that
    calibrate the conversion and judge the max-robust-drop search (default: `check`);
    bench: how throughput is timed (default: BenchSettings()).
    convert_options: how every model is converted but its target (allocation, alphas,
    include, exclude, lowering, tune, ...); with tune, tune_batch defaults to the bench
    batch. Parity is not checked: the sweep measures accuracy instead.
    """
    say = progress or (lambda message: None)
    targets = sweep_targets(mac_reductions, betas)
    options = ConvertOptions.of(convert_options, check_parity=False)
    resolve_allocation(options.allocation, has_curves=True)  # a bad name fails before any work
    if max_robust_drop is not None:
        check_max_drop(max_robust_drop)
    loaded = load_model(model)
    bench = bench_for(loaded, bench or BenchSettings())
    if options.tune is not None and options.tune_batch is None:
        options = ConvertOptions.of(options, tune_batch=bench.batch)
    analyzed = _check_conversion(loaded, options)
    out = Path(out_dir)
    _check_output(Path(model), out, targets, max_robust_drop is not None)
    calibration = calibration or check
    by_beta = betas is not None
    say(f"attacking original ({len(check.dataset)} samples)")
    check = with_transfer(check, loaded)
    original = check.evaluate(model)
    with atomic_folder(out) as stage, tempfile.TemporaryDirectory(prefix="gdws-sweep-") as scratch:
        paths = _output_paths(Path(model), stage, targets)
        options = shared_tune_cache(options, Path(scratch))
        calibrated = options
        if pass_named(options.method).calibrates:
            say(f"calibrating on {len(calibration.dataset)} samples of {calibration.dataset.name}")
            calibrated = calibrate(analyzed, calibration, options, by_beta=by_beta)
        models = [ModelToMeasure(Path(model), "original", "original", analyzed.total_macs, 1.0)]
        for (label, key, value), path in zip(targets, paths["targets"]):
            say(f"converting at {label}")
            models.append(
                convert_to_file(loaded, path, label, ConvertOptions.of(calibrated, **{key: value}))
            )
        operating_point = None
        if max_robust_drop is not None:
            search = calibrated if not by_beta else _for_search(options, calibrated)
            operating_point = _search(Path(model), max_robust_drop, calibration, search, paths, say)
            models.extend(_max_drop_entry(operating_point, paths["max-drop"]))
        points = measure_models(models, [original], check, bench, say)
        result = SweepResult(
            model=str(model),
            allocation="lego per layer"
            if by_beta
            else resolve_allocation(options.allocation, calibrated.loss_curves is not None),
            check=check.describe(),
            calibration=calibration.describe(),
            bench=bench,
            points=tuple(published_in(point, out) for point in points),
            operating_point=operating_point,
        )
        write_sweep(result, stage)
    return result


def write_sweep(result: SweepResult, out_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """sweep.json and sweep.png in `out_dir`, each written atomically."""
    out = Path(out_dir)
    with atomic_open(out / JSON_NAME) as handle:
        json.dump(result.to_dict(), handle, indent=2)
        handle.write("\n")
    return out / JSON_NAME, save_sweep_plot(result, out / PLOT_NAME)


def model_stem(model: Union[str, Path]) -> str:
    """The model's file name without .onnx, the prefix of everything the sweep writes."""
    name = Path(model).name
    return name[: -len(".onnx")] if name.endswith(".onnx") else name


def sweep_targets(
    mac_reductions: Optional[Sequence[float]], betas: Optional[Sequence[float]]
) -> List[Tuple[str, str, float]]:
    """(label, convert option, value) per target; MAC reductions by default."""
    if mac_reductions is not None and betas is not None:
        raise GdwsError("give MAC reductions or betas, not both")
    if betas is not None:
        values, key, label = betas, "beta", "beta={:g}"
        valid = all(np.isfinite(b) and b >= 0 for b in values)
    else:
        values = DEFAULT_MAC_REDUCTIONS if mac_reductions is None else mac_reductions
        key, label = "mac_reduction", "{:g}x"
        valid = all(np.isfinite(r) and r >= 1 for r in values)
    if not values:
        raise GdwsError("the sweep needs at least one target")
    if not valid:
        what = "betas must be >= 0" if key == "beta" else "MAC reductions must be >= 1"
        raise GdwsError(f"{what}, got {', '.join(f'{v:g}' for v in values)}")
    if len(set(values)) != len(values):
        raise GdwsError(f"targets repeat: {', '.join(f'{v:g}' for v in values)}")
    return [(label.format(value), key, float(value)) for value in values]


def _output_paths(
    model: Path, out: Path, targets: Sequence[Tuple[str, str, float]]
) -> Dict[str, Any]:
    """The converted models' files in `out`: one per target and the max-drop answer."""
    stem = model_stem(model)
    return {
        "targets": [
            out / f"{stem}.{'beta' if key == 'beta' else 'r'}{value:g}.gdws.onnx"
            for _, key, value in targets
        ],
        "max-drop": out / f"{stem}.max-drop.gdws.onnx",
    }


def _check_output(
    model: Path, out: Path, targets: Sequence[Tuple[str, str, float]], max_drop: bool
) -> None:
    """--out can become the sweep's folder and no file the sweep writes there is the input."""
    names = _output_paths(model, out, targets)
    files = [*names["targets"], *([names["max-drop"]] if max_drop else [])]
    check_output_folder(out, [*files, out / JSON_NAME, out / PLOT_NAME], model)


def published_in(point: MeasuredPoint, out: Path) -> MeasuredPoint:
    """The point with its model file where the output folder `out` puts it."""
    if point.kind == "original":
        return point
    return replace(point, model=str(out / Path(point.model).name))


def bench_for(loaded: LoadedModel, bench: BenchSettings) -> BenchSettings:
    """The bench settings for this model: a model exported with a fixed batch (torch's
    default) is timed at that batch; asking for another one is refused before any work."""
    bench.validate()
    fixed = fixed_batch(loaded.model)
    if bench.batch is None:
        return replace(bench, batch=fixed or DEFAULT_BENCH_BATCH)
    if fixed is not None and bench.batch != fixed:
        raise GdwsError(
            f"--bench-batch {bench.batch}: the model has a fixed batch of {fixed}; "
            f"leave --bench-batch out (or give {fixed}), or export with a dynamic batch"
        )
    return bench


def _check_conversion(loaded: LoadedModel, options: ConvertOptions) -> AnalyzedModel:
    """Fail before any work on lowering and tune options that do not go together, or a
    layer selection that leaves no Conv to rewrite; the model analyzed once for the sweep."""
    cost_model_for(options.lowering, options.tune, options.tune_batch, None, loaded.model)
    analyzed = pass_named(options.method).select(analyze(loaded, **options.selection))
    if not analyzed.eligible:
        raise GdwsError("the model has no Conv that GDWS can rewrite")
    return analyzed


def shared_tune_cache(options: ConvertOptions, scratch: Path) -> ConvertOptions:
    """With tuning on, one cache of layer timings for every conversion of the run."""
    if options.tune is None or options.tune_cache is not None:
        return options
    return ConvertOptions.of(options, tune_cache=scratch / "tune-cache.json")


def convert_to_file(
    loaded: LoadedModel, path: Path, label: str, options: ConvertOptions
) -> ModelToMeasure:
    from gdws_deploy.pipeline.convert import convert

    converted, report = convert(loaded, options)
    save_model(converted, path, like=loaded)
    macs, reduction = report.macs_after, report.reduction
    return ModelToMeasure(path, label, "target", macs, reduction, options.method)


def _for_search(options: ConvertOptions, by_beta: ConvertOptions) -> ConvertOptions:
    """The search's options when the targets are betas: those calibrate LEGO (alphas), the
    search a MAC target of its own; the SVDs are shared."""
    return ConvertOptions.of(options, alphas=None, spectra_cache=by_beta.spectra_cache)


def _search(
    model: Path,
    max_drop: float,
    calibration: RobustnessCheck,
    options: ConvertOptions,
    paths: Mapping[str, Any],
    say: Progress,
) -> OperatingPoint:
    """The --max-robust-drop search, calibrated as convert's; its answer goes into the
    sweep folder. A search that keeps no target is a result here too."""

    def report(probe) -> None:
        say(f"search: {probe.summary}")

    say(f"searching the fastest conversion within {max_drop:.3g} robust drop")
    try:
        point, _, _ = convert_calibrated(
            model, paths["max-drop"], options, calibration, max_drop, on_probe=report
        )
    except DropNotKeptError as error:
        point = error.point
    return point


def _max_drop_entry(point: OperatingPoint, path: Path) -> List[ModelToMeasure]:
    """The search's answer as a model to measure; none when no target kept the drop."""
    if point.best is None:
        return []
    best = point.best
    label = f"drop<={point.max_drop:.1%}: {best.reduction:.2f}x"
    return [ModelToMeasure(path, label, "max-drop", best.macs, best.reduction, "gdws")]
