"""`gdws-deploy compare`: the robust-compression methods side by side on one model.

Every method (a compression pass, optionally followed by INT8) is run at every MAC
target, and all the models, the original first, are measured by pipeline/measure.py in
one run: accuracy under one RobustnessCheck, weight storage counted one way, throughput
timed interleaved. That is what makes a claim such as "structure beats compression for
real frames per second" checkable on the user's own model rather than read off a paper.

The methods get what each is designed to use: GDWS its calibration (loss curves on the
calibration data) and, with a tune backend, its fastest forms; GKP and ATMC their
one-shot, data-free rewrites; INT8 its calibration samples.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from gdws_deploy.atomic import atomic_folder, atomic_open, check_output_folder
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import LoadedModel, load_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.int8 import DEFAULT_CALIB_LIMIT, QUANTIZE_ONLY
from gdws_deploy.passes.int8.calibration import calibration_samples
from gdws_deploy.passes.registry import PASSES, pass_named
from gdws_deploy.pipeline.measure import ModelToMeasure, measure_models
from gdws_deploy.pipeline.results import BenchSettings, CompareResult
from gdws_deploy.pipeline.sweep import (
    bench_for,
    convert_to_file,
    model_stem,
    published_in,
    shared_tune_cache,
    sweep_targets,
)
from gdws_deploy.robustness.check import RobustnessCheck, with_transfer
from gdws_deploy.robustness.sensitivity import calibrate

JSON_NAME = "compare.json"
PLOT_NAME = "compare.png"
# Options only GDWS reads: every other pass runs without them.
_GDWS_ONLY = {
    "tune": None,
    "tune_batch": None,
    "tune_cache": None,
    "lowering": "auto",
    "allocation": "auto",
}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class MethodChoice:
    """One entry of --methods: a pass, and whether INT8 follows it ("gdws+int8")."""

    method: str
    int8: bool = False

    @property
    def label(self) -> str:
        return f"{self.method}+int8" if self.int8 and self.method != QUANTIZE_ONLY else self.method

    @property
    def takes_target(self) -> bool:
        return self.method != QUANTIZE_ONLY


def parse_methods(text: str) -> Tuple[MethodChoice, ...]:
    """'gdws,gkp,gdws+int8' -> MethodChoices; GdwsError naming an unknown or repeated one."""
    choices = []
    for item in (part.strip() for part in text.split(",")):
        name, plus, suffix = item.partition("+")
        if not name or (plus and suffix != QUANTIZE_ONLY):
            raise GdwsError(f"--methods: {item!r} is not METHOD or METHOD+int8")
        if name not in PASSES:
            raise GdwsError(f"--methods: unknown method {name!r} (choose from {', '.join(PASSES)})")
        choices.append(MethodChoice(name, bool(plus) or name == QUANTIZE_ONLY))
    labels = [choice.label for choice in choices]
    if len(set(labels)) != len(labels):
        raise GdwsError(f"--methods repeats a method: {', '.join(labels)}")
    return tuple(choices)


def run_compare(
    model: Union[str, Path],
    out_dir: Union[str, Path],
    check: RobustnessCheck,
    *,
    methods: Sequence[MethodChoice],
    mac_reductions: Sequence[float],
    calibration: Optional[RobustnessCheck] = None,
    bench: Optional[BenchSettings] = None,
    convert_options: Optional[ConvertOptions] = None,
    progress: Optional[Progress] = None,
) -> CompareResult:
    """Convert `model` with every method at every MAC reduction, measure all the models
    side by side, write `out_dir`/compare.json, compare.png and the converted models.

    calibration: the data GDWS calibrates on and INT8 takes its samples from (default:
    `check`'s); convert_options: GDWS's settings (tune, lowering, allocation, ...), which
    the other passes run without.
    """
    say = progress or (lambda message: None)
    if not methods:
        raise GdwsError("--methods: give at least one method")
    targets = sweep_targets(mac_reductions, None)
    loaded = load_model(model)
    bench = bench_for(loaded, bench or BenchSettings())
    options = ConvertOptions.of(convert_options, check_parity=False)
    if options.tune is not None and options.tune_batch is None:
        options = ConvertOptions.of(options, tune_batch=bench.batch)
    calibration = calibration or check
    rows = _rows(methods, targets)
    out = Path(out_dir)
    stem = model_stem(model)
    check_output_folder(
        out,
        [out / _file_name(stem, row) for row in rows] + [out / JSON_NAME, out / PLOT_NAME],
        model,
    )
    analyzed = analyze(loaded, **options.selection)
    say(f"attacking original ({len(check.dataset)} samples)")
    check = with_transfer(check, loaded)
    original = check.evaluate(model)
    entries = [ModelToMeasure(Path(model), "original", "original", analyzed.total_macs, 1.0)]
    with atomic_folder(out) as stage, tempfile.TemporaryDirectory(
        prefix="gdws-compare-"
    ) as scratch:
        per_method = _method_options(options, methods, analyzed, calibration, Path(scratch), say)
        for row in rows:
            choice, label, reduction = row
            say(f"converting: {label}")
            options_here = per_method[choice]
            if reduction is not None:
                options_here = ConvertOptions.of(options_here, mac_reduction=reduction)
            entries.append(
                _converted(loaded, stage / _file_name(stem, row), label, options_here, choice)
            )
        points = measure_models(entries, [original], check, bench, say)
        result = CompareResult(
            model=str(model),
            methods=tuple(choice.label for choice in methods),
            mac_reductions=tuple(value for _, _, value in targets),
            check=check.describe(),
            calibration=calibration.describe(),
            bench=bench,
            points=tuple(published_in(point, out) for point in points),
        )
        write_compare(result, stage)
    return result


def write_compare(result: CompareResult, out_dir: Union[str, Path]) -> Tuple[Path, Path]:
    """compare.json and compare.png in `out_dir`, each written atomically."""
    from gdws_deploy.pipeline.plot import save_compare_plot

    out = Path(out_dir)
    with atomic_open(out / JSON_NAME) as handle:
        json.dump(result.to_dict(), handle, indent=2)
        handle.write("\n")
    return out / JSON_NAME, save_compare_plot(result, out / PLOT_NAME)


# (method, row label, MAC reduction or None) of each converted model, in table order
Row = Tuple[MethodChoice, str, Optional[float]]


def _rows(methods: Sequence[MethodChoice], targets: Sequence[Tuple[str, str, float]]) -> List[Row]:
    rows: List[Row] = []
    for choice in methods:
        if not choice.takes_target:
            rows.append((choice, choice.label, None))
            continue
        rows.extend((choice, f"{choice.label} {label}", value) for label, _, value in targets)
    return rows


def _file_name(stem: str, row: Row) -> str:
    choice, _, reduction = row
    target = "" if reduction is None else f".r{reduction:g}"
    return f"{stem}{target}.{choice.label}.onnx"


def _method_options(
    options: ConvertOptions,
    methods: Sequence[MethodChoice],
    analyzed: Any,
    calibration: RobustnessCheck,
    scratch: Path,
    say: Progress,
) -> Dict[MethodChoice, ConvertOptions]:
    """Each method's conversion options: GDWS's calibrated once and shared with its INT8
    variant, every other pass without GDWS's settings; INT8 with its calibration samples."""
    samples = None
    if any(choice.int8 for choice in methods):
        samples = calibration_samples(
            calibration.dataset.x,
            DEFAULT_CALIB_LIMIT,
            calibration.seed,
            calibration.mean,
            calibration.std,
        )
    calibrated: Dict[str, ConvertOptions] = {}
    chosen = {}
    for choice in methods:
        if choice.method not in calibrated:
            here = ConvertOptions.of(options, method=choice.method)
            if choice.method != "gdws":
                here = ConvertOptions.of(here, **_GDWS_ONLY)
            else:
                here = shared_tune_cache(here, scratch)
            if pass_named(choice.method).calibrates:
                say(f"calibrating {choice.method} on {len(calibration.dataset)} samples")
                here = calibrate(pass_named(choice.method).select(analyzed), calibration, here)
            calibrated[choice.method] = here
        chosen[choice] = ConvertOptions.of(
            calibrated[choice.method],
            int8=choice.int8,
            int8_calibration=samples if choice.int8 else None,
        )
    return chosen


def _converted(
    loaded: LoadedModel, path: Path, label: str, options: ConvertOptions, choice: MethodChoice
) -> ModelToMeasure:
    entry = convert_to_file(loaded, path, label, options)
    return ModelToMeasure(entry.path, label, "method", entry.macs, entry.reduction, choice.label)
