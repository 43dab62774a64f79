"""--lowering and --tune (convert: also --tune-batch, --tune-threads, --tune-cache): how
GDWS layers are written, and the backend that times their forms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags, number

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

LOWERING_CHOICES = ("auto", "gather", "pad", "sum", "fold", "dense")
TUNE_CHOICES = ("ort", "trt")
LOWERING_HELP = (
    "How GDWS layers are written: gather (exact factors), pad (no Gather), fold "
    "(the producer emits the channels), dense (keep), auto (per layer)."
)
TUNE_HELP = (
    "With --lowering auto: time each layer's forms on this backend and pick the "
    "fastest; the result is timed against MODEL and never slower."
)
TIMING_OPTIONS = (
    click.option(
        "--tune-batch",
        type=number(int),
        metavar="N",
        help="Batch size to tune at [default: MODEL's fixed batch, else 1: edge latency].",
    ),
    click.option(
        "--tune-threads",
        type=number(int),
        metavar="N",
        help="onnxruntime threads for --tune ort [default: onnxruntime's].",
    ),
    click.option(
        "--tune-cache",
        type=click.Path(path_type=Path),
        help="JSON file of measured layer times, read and updated (reused across runs).",
    ),
)


class TuneArgs(ArgGroup):
    """Builds the lowering and tune fields of ConvertOptions (tune: a timing Backend).

    convert declares every flag; sweep (`timing=False`) only --lowering and --tune, with
    its own help, a bare --tune meaning `bare`, and the threads of its own --threads.
    """

    def __init__(
        self,
        lowering_help: str = LOWERING_HELP,
        tune_help: str = TUNE_HELP,
        bare: Optional[str] = None,
        timing: bool = True,
    ) -> None:
        self.timing = timing
        bare_tune = {} if bare is None else {"is_flag": False, "flag_value": bare}
        self.options = (
            click.option(
                "--lowering",
                type=click.Choice(LOWERING_CHOICES),
                default="auto",
                show_default=True,
                help=lowering_help,
            ),
            click.option("--tune", type=click.Choice(TUNE_CHOICES), help=tune_help, **bare_tune),
            *(TIMING_OPTIONS if timing else ()),
        )

    def apply(
        self, options: ConvertOptions, flags: Flags, threads: Optional[int] = None
    ) -> ConvertOptions:
        """`options` with these flags; `threads`: onnxruntime's for --tune ort where
        --tune-threads is not declared. --tune ort runs on the providers of the verb's
        --device and --providers (a DeviceArgs; the CPU without one)."""
        from gdws_deploy.options import ConvertOptions
        from gdws_deploy.runtime.providers import ort_providers
        from gdws_deploy.speed.backends import backend_named

        tune = flags["tune"]
        providers = None
        if tune == "ort":
            providers = ort_providers(flags.get("device", "cpu"), flags.get("providers"))
        if not self.timing:
            threads = threads if tune == "ort" else None
            return ConvertOptions.of(
                options, lowering=flags["lowering"], tune=backend_named(tune, threads, providers)
            )
        return ConvertOptions.of(
            options,
            lowering=flags["lowering"],
            tune=backend_named(tune, flags["tune_threads"], providers),
            tune_batch=flags["tune_batch"],
            tune_cache=flags["tune_cache"],
        )
