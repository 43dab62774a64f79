"""A conversion calibrated on data: `convert --dataset` and `convert --max-robust-drop`.

Data changes what a target means: the allocation is judged by measured robust loss (or
alphas) instead of the GDWS error alone, and with a robustness budget the target itself is
searched, under each allocation rule worth trying (operating_point). Calibration runs once
per rule; the fixed target, or every probe of the search, reuse what it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from gdws_deploy.atomic import check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import load_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.pipeline.convert import ConvertReport, Stage, convert_file
from gdws_deploy.pipeline.operating_point import (
    Candidate,
    OperatingPoint,
    Probe,
    Refine,
    check_max_drop,
    clean_budget,
    convert_within_drop,
    knobs_for,
    search_rules,
)
from gdws_deploy.pipeline.rule_choice import RuleChoice, chooses_rule, convert_most_robust_rule
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.sensitivity import calibrate, refuse_multi_exit


class DropNotKeptError(GdwsError):
    """No probe kept the robust and clean drops within their budgets; nothing was written.

    point: the search, every probe included, for whoever shows why."""

    def __init__(self, point: OperatingPoint) -> None:
        super().__init__(
            f"no conversion keeps the robust drop within {point.max_drop:g} and the clean drop "
            f"within {point.max_clean_drop:g}: nothing written"
        )
        self.point = point


def convert_calibrated(
    model: Union[str, Path],
    output: Union[str, Path],
    options: ConvertOptions,
    check: RobustnessCheck,
    max_robust_drop: Optional[float] = None,
    *,
    max_clean_drop: Optional[float] = None,
    on_probe: Optional[Callable[[Probe], None]] = None,
    stage: Optional[Stage] = None,
    refine: Optional[Refine] = None,
) -> Tuple[Union[OperatingPoint, RuleChoice, None], ConvertReport, bool]:
    """Calibrate `options` on `check`, then convert `model` to `output` at options'
    target (a MAC target under allocation auto: under the rule judged most robust on
    `check`, see rule_choice), or, given max_robust_drop, search for the fastest conversion
    whose robust drop under `check` stays within it and clean drop within max_clean_drop
    (default: operating_point.clean_budget): by speed goal when tuned, else by MAC target,
    under each rule of operating_point.search_rules (see operating_point).

    Returns the search (without max_robust_drop: the RuleChoice, or None), the report and
    whether `output` holds a rewritten model. stage: told when calibration starts (the
    conversions are quiet); on_probe: each probe of the search as it is measured; refine:
    what each probe goes through before it is judged (the search's answer is the refined
    model). Raises DropNotKeptError (a GdwsError) when no target keeps the drop. The
    output path and the drop are checked before any work.
    """
    check_output_path(output, model)
    if max_robust_drop is not None:
        check_max_drop(max_robust_drop)
        clean_budget(max_robust_drop, max_clean_drop)
    if stage is not None:
        stage(f"calibrating on {len(check.dataset)} samples of {check.dataset.name}")
    refuse_multi_exit(len(load_model(model).model.graph.output))
    if max_robust_drop is None and chooses_rule(options):
        return convert_most_robust_rule(model, output, options, check, stage)
    if max_robust_drop is None:
        report, rewritten = convert_file(model, output, calibrate(model, check, options))
        return None, report, rewritten
    point, report = convert_within_drop(
        model,
        output,
        max_robust_drop,
        check,
        _candidates(model, check, options),
        max_clean_drop=max_clean_drop,
        on_probe=on_probe,
        refine=refine,
    )
    if report is None:
        raise DropNotKeptError(point)
    return point, report, report.converted > 0


# What calibration adds to options; a family's own target and settings stay its own.
CALIBRATION_PRODUCTS = ("alphas", "loss_curves", "spectra_cache")


def _candidates(
    model: Union[str, Path], check: RobustnessCheck, options: ConvertOptions
) -> List[Candidate]:
    """Every (rule, family) a search brackets, its options calibrated once per rule and kind
    of target (one SVD cache among them); under a speed goal the measured rule's curves are
    per channel, as the speed goal's options are (sensitivity.measure_loss_curves)."""
    calibrated: Dict[Tuple[str, bool], ConvertOptions] = {}
    candidates: List[Candidate] = []
    for knob in knobs_for(options):
        for rule in search_rules(options, knob):
            aimed = knob.options(ConvertOptions.of(options, allocation=rule), knob.grid[0])
            key = (rule, aimed.has_speed_goal)
            if key not in calibrated:
                shared = next(iter(calibrated.values()), options).spectra_cache
                calibrated[key] = calibrate(
                    model, check, ConvertOptions.of(aimed, spectra_cache=shared)
                )
            products = {name: getattr(calibrated[key], name) for name in CALIBRATION_PRODUCTS}
            candidates.append((ConvertOptions.of(options, allocation=rule, **products), knob))
    return candidates
