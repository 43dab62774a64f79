"""A conversion calibrated on data: `convert --dataset` and `convert --max-robust-drop`.

Data changes what a MAC target means: the allocation is judged by measured robust loss
(or alphas) instead of the GDWS error alone, and with a robustness budget the target
itself is searched. Calibration runs once; the fixed target, or every probe of the search
and the answer written after it, reuse what it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple, Union

from gdws_deploy.atomic import check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.options import ConvertOptions
from gdws_deploy.pipeline.convert import ConvertReport, Stage, convert_file
from gdws_deploy.pipeline.operating_point import (
    OperatingPoint,
    Probe,
    check_max_drop,
    convert_within_drop,
)
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.sensitivity import calibrate


class DropNotKeptError(GdwsError):
    """No MAC reduction kept the robust drop within the budget; nothing was written.

    point: the search, every probe included, for whoever shows why."""

    def __init__(self, point: OperatingPoint) -> None:
        super().__init__(
            f"no MAC reduction keeps the robust drop within {point.max_drop:g}: nothing written"
        )
        self.point = point


def convert_calibrated(
    model: Union[str, Path],
    output: Union[str, Path],
    options: ConvertOptions,
    check: RobustnessCheck,
    max_robust_drop: Optional[float] = None,
    *,
    on_probe: Optional[Callable[[Probe], None]] = None,
    stage: Optional[Stage] = None,
) -> Tuple[Optional[OperatingPoint], ConvertReport, bool]:
    """Calibrate `options` on `check`, then convert `model` to `output` at options'
    MAC target, or, given max_robust_drop, at the largest one whose robust drop under
    `check` stays within it (see operating_point).

    Returns the search (None without max_robust_drop), the report and whether `output`
    holds a rewritten model. stage: told when calibration starts (the conversions are
    quiet); on_probe: each probe of the search as it is measured. Raises DropNotKeptError
    (a GdwsError) when no target keeps the drop. The output path and the drop are
    checked before any work.
    """
    check_output_path(output, model)
    if max_robust_drop is not None:
        check_max_drop(max_robust_drop)
    if stage is not None:
        stage(f"calibrating on {len(check.dataset)} samples of {check.dataset.name}")
    calibrated = calibrate(model, check, options)
    if max_robust_drop is None:
        report, rewritten = convert_file(model, output, calibrated)
        return None, report, rewritten
    point, report = convert_within_drop(
        model, output, max_robust_drop, check, calibrated, on_probe=on_probe
    )
    if report is None:
        raise DropNotKeptError(point)
    return point, report, report.converted > 0
