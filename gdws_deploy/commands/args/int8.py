"""--int8, --calib, --calib-limit: quantize a conversion to INT8, calibrated on data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags
from gdws_deploy.commands.args.data import DATASET_HELP
from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.int8 import DEFAULT_CALIB_LIMIT, QUANTIZE_ONLY

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions


class Int8Args(ArgGroup):
    """Adds INT8 and its calibration samples to the options: --calib's images, drawn with
    --seed and normalized by --mean / --std as the model expects (the verb's DataArgs)."""

    options = (
        click.option(
            "--int8",
            is_flag=True,
            help="Then quantize the result to INT8 (QDQ: symmetric int8 activations, "
            "per-channel int8 weights), as TensorRT imports it and onnxruntime runs it; "
            "needs --calib.",
        ),
        click.option(
            "--calib",
            metavar="SPEC",
            help="Data INT8 calibrates its activation ranges on (training data, e.g. "
            f"photos:train): {DATASET_HELP}",
        ),
        click.option(
            "--calib-limit",
            type=click.IntRange(min=1),
            metavar="N",
            help=f"Calibrate on N samples of --calib drawn at random with --seed "
            f"[default: {DEFAULT_CALIB_LIMIT}].",
        ),
    )

    @staticmethod
    def apply(options: ConvertOptions, flags: Flags) -> ConvertOptions:
        """`options` with int8 and the samples (method int8 implies --int8); GdwsError
        for INT8 without --calib, or --calib / --calib-limit without INT8."""
        if not (flags["int8"] or options.method == QUANTIZE_ONLY):
            if flags["calib"] is not None or flags["calib_limit"] is not None:
                raise GdwsError("--calib calibrates INT8: give --int8 (or --method int8) too")
            return options
        if flags["calib"] is None:
            raise GdwsError("INT8 calibrates on data: give --calib SPEC (training data)")
        from gdws_deploy.options import ConvertOptions
        from gdws_deploy.passes.int8.calibration import calibration_samples
        from gdws_deploy.robustness.attacks import parse_channels  # torch: only when asked
        from gdws_deploy.robustness.data import load_dataset

        samples = calibration_samples(
            load_dataset(flags["calib"]).x,
            flags["calib_limit"] or DEFAULT_CALIB_LIMIT,
            flags["seed"],
            parse_channels(flags["mean"], "--mean"),
            parse_channels(flags["std"], "--std"),
        )
        return ConvertOptions.of(options, int8=True, int8_calibration=samples)
