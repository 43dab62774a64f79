"""--max-robust-drop with the data and attack flags: the data a conversion is calibrated
on, and the robustness budget that chooses its MAC target."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags, number
from gdws_deploy.commands.args.check import CheckArgs
from gdws_deploy.errors import GdwsError

if TYPE_CHECKING:
    from gdws_deploy.robustness.check import RobustnessCheck


class CalibrationArgs(ArgGroup):
    """Builds the RobustnessCheck on --dataset (None without it); `validate` says which
    targets a calibration or a search can take."""

    def __init__(self, check: CheckArgs) -> None:
        self.check = check
        self.options = (
            click.option(
                "--max-robust-drop",
                type=number(float),
                metavar="D",
                help="Search the fastest conversion losing at most D robust accuracy (0.01: "
                "one point) on --dataset, instead of a fixed target: speed-up goals with "
                "--tune (speed measured there), else MAC targets; under --allocation auto "
                "both the relative and the measured rule are tried.",
            ),
            click.option(
                "--max-clean-drop",
                type=number(float),
                metavar="C",
                help="With --max-robust-drop: lose at most C clean accuracy too "
                "[default: twice D].",
            ),
        )

    @staticmethod
    def validate(flags: Flags) -> None:
        """Calibration data serves a MAC target; --max-robust-drop chooses that target."""
        per_layer = flags["beta"] is not None or flags["budget"] is not None
        if flags["max_robust_drop"] is None:
            if flags["max_clean_drop"] is not None:
                raise GdwsError("--max-clean-drop bounds --max-robust-drop's search: give both")
            if flags["dataset"] is not None and per_layer:
                raise GdwsError(
                    "--dataset calibrates a MAC-reduction target; --beta and --budget do not use it"
                )
            return
        from gdws_deploy.pipeline.operating_point import check_max_drop

        check_max_drop(flags["max_robust_drop"])
        if flags["max_clean_drop"] is not None:
            check_max_drop(flags["max_clean_drop"], "--max-clean-drop")
        if per_layer or flags["mac_reduction"] is not None:
            raise GdwsError(
                "--max-robust-drop chooses the target itself: leave out "
                "--beta, --budget and --mac-reduction"
            )
        if flags["dataset"] is None:
            raise GdwsError(
                "--max-robust-drop needs --dataset CALIB, the data the drop is measured on"
            )
        if flags["speedup"] is not None or flags["speed_ratio"] is not None:
            raise GdwsError(
                "--max-robust-drop searches the speed goal itself (with --tune): "
                "leave out --speedup and --speed-ratio"
            )

    def build(self, flags: Flags) -> Optional[RobustnessCheck]:
        return None if flags["dataset"] is None else self.check.build(flags)
