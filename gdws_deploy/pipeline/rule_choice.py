"""A calibrated MAC target under `--allocation auto`: the rule the data judges most robust.

Loss curves measured one layer at a time on the original's adversarial inputs can mislead:
on a PreActResNet-18 at 2x the measured rule lost 4 points of robust accuracy where the
scale-free relative rule, the uncalibrated default, lost none; on a digits CNN it was the
other way round (README, Allocation rules). With data at hand the choice is measured, not
assumed: the model is converted at the asked target under each rule of AUTO_RULES, each
result is judged by the check, and the most robust is written (clean accuracy breaks ties,
then the order of AUTO_RULES, the default first). A calibrated conversion is therefore
never measured worse on the calibration data than the uncalibrated default.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from gdws_deploy.atomic import check_output_path
from gdws_deploy.ir.graph import load_model, save_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.gdws.decompose import SpectraCache
from gdws_deploy.pipeline.convert import ConvertReport, Stage, convert_file
from gdws_deploy.pipeline.operating_point import AUTO_RULES, shared_caches
from gdws_deploy.robustness.check import RobustnessCheck, with_transfer
from gdws_deploy.robustness.sensitivity import calibrate


@dataclass(frozen=True)
class RuleScore:
    """One rule's conversion at the target, as the check measured it."""

    rule: str
    reduction: float
    speedup: Optional[float]
    clean_acc: float
    robust_acc: float


@dataclass(frozen=True)
class RuleChoice:
    """Every rule tried at `target` (in AUTO_RULES order), on which data, and the one kept."""

    target: str
    dataset: str
    samples: int
    scores: Tuple[RuleScore, ...]
    chosen: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def chooses_rule(options: ConvertOptions) -> bool:
    """Whether a calibrated conversion at a fixed target picks its rule by measurement:
    GDWS under allocation auto with a MAC target (under a speed goal auto is relative)."""
    return (
        options.method == "gdws"
        and options.allocation == "auto"
        and options.mac_reduction is not None
        and not options.has_speed_goal
    )


def convert_most_robust_rule(
    model: Union[str, Path],
    output: Union[str, Path],
    options: ConvertOptions,
    check: RobustnessCheck,
    stage: Optional[Stage] = None,
) -> Tuple[RuleChoice, ConvertReport, bool]:
    """Convert `model` at options' target under each rule of AUTO_RULES (calibrated on
    `check`, one SVD per layer and, when tuned, one tune cache among them), judge each by
    `check`, and write the most robust to `output`. Returns the choice, the written
    conversion's report and whether `output` holds a rewritten model."""
    check_output_path(output, model)
    original = load_model(model)
    check = with_transfer(check, original)
    with tempfile.TemporaryDirectory(prefix="gdws-rules-") as workdir:
        shared = shared_caches(options, workdir, SpectraCache())
        runs: List[Tuple[RuleScore, ConvertReport, bool, Path]] = []
        for rule in AUTO_RULES:
            if stage is not None:
                stage(f"converting under the {rule} rule and judging it")
            ruled = calibrate(original, check, ConvertOptions.of(shared, allocation=rule))
            path = Path(workdir) / f"{rule}.onnx"
            report, rewritten = convert_file(model, path, ruled)
            result = check.evaluate(path)
            score = RuleScore(
                rule, report.reduction, report.measured_speedup, result.clean_acc, result.robust_acc
            )
            runs.append((score, report, rewritten, path))
        best = max(runs, key=lambda run: (run[0].robust_acc, run[0].clean_acc))
        save_model(load_model(best[3]).model, output, like=original)
    choice = RuleChoice(
        best[1].target,
        check.dataset.name,
        len(check.dataset),
        tuple(run[0] for run in runs),
        best[0].rule,
    )
    return choice, best[1], best[2]
