"""A calibrated MAC target under `--allocation auto`: the rule the data judges most robust.

Loss curves measured one layer at a time on the original's adversarial inputs can mislead:
on a PreActResNet-18 at 2x the measured rule lost 4 points of robust accuracy where the
scale-free relative rule, the uncalibrated default, lost none; on a digits CNN it was the
other way round (README, Allocation rules). With data at hand the choice is measured, not
assumed: the model is converted at the asked target under each rule of AUTO_RULES and each
result is judged by the check. The default (relative, first) is kept unless another rule is
more robust by a margin the samples can vouch for: a paired gain of at least two standard
errors (95 %) in robust accuracy, and clean accuracy not lower by as much. On a few hundred
samples a one-point difference is noise (the shared VGG-16's 500 calibration crops once
preferred the measured rule by 0.4 points, and it lost 2.7 points of clean accuracy on
held-out crops); a rule only replaces the default on evidence.
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
from gdws_deploy.robustness.evaluate import Z_95, EvalReport, paired_z
from gdws_deploy.robustness.sensitivity import calibrate


@dataclass(frozen=True)
class RuleScore:
    """One rule's conversion at the target, as the check measured it; robust_z and
    clean_z: its paired gains over the default's, in standard errors (0 for the default)."""

    rule: str
    reduction: float
    speedup: Optional[float]
    clean_acc: float
    robust_acc: float
    robust_z: float = 0.0
    clean_z: float = 0.0

    @property
    def beats_default(self) -> bool:
        """Significantly more robust than the default, and not significantly less clean."""
        return self.robust_z >= Z_95 and self.clean_z > -Z_95


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
        default: Optional[EvalReport] = None
        for rule in AUTO_RULES:
            if stage is not None:
                stage(f"converting under the {rule} rule and judging it")
            ruled = calibrate(original, check, ConvertOptions.of(shared, allocation=rule))
            path = Path(workdir) / f"{rule}.onnx"
            report, rewritten = convert_file(model, path, ruled)
            result = check.evaluate(path)
            default = default or result
            score = RuleScore(
                rule,
                report.reduction,
                report.measured_speedup,
                result.clean_acc,
                result.robust_acc,
                paired_z(result.verdicts.robust, default.verdicts.robust),
                paired_z(result.verdicts.clean, default.verdicts.clean),
            )
            runs.append((score, report, rewritten, path))
        winners = [run for run in runs[1:] if run[0].beats_default]
        best = max(winners, key=lambda run: run[0].robust_acc, default=runs[0])
        save_model(load_model(best[3]).model, output, like=original)
    choice = RuleChoice(
        best[1].target,
        check.dataset.name,
        len(check.dataset),
        tuple(run[0] for run in runs),
        best[0].rule,
    )
    return choice, best[1], best[2]
