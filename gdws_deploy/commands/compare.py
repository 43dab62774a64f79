"""`gdws-deploy compare`: every compression method on one table and one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click
from rich.console import Console

from gdws_deploy.commands.args.allocation import AllocationArgs
from gdws_deploy.commands.args.attack import AttackArgs
from gdws_deploy.commands.args.base import NUMBERS
from gdws_deploy.commands.args.check import CheckArgs
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.commands.args.device import DeviceArgs
from gdws_deploy.commands.args.timing import TimingArgs
from gdws_deploy.commands.args.tune import TuneArgs
from gdws_deploy.commands.args.workers import WorkersArgs
from gdws_deploy.commands.render.compare import compare_table
from gdws_deploy.commands.render.console import stdout_console

DATA, ATTACKS, ALLOCATION, TIMING = (
    DataArgs(batch_size=128),
    AttackArgs(),
    AllocationArgs(),
    TimingArgs(),
)
CHECK = CheckArgs(DATA, ATTACKS)
DEVICE, WORKERS = DeviceArgs(providers=True), WorkersArgs()
TUNE = TuneArgs(
    lowering_help="How GDWS layers are written (see convert --help).",
    tune_help="Time each GDWS layer's forms on this backend at --bench-batch and keep the "
    "fastest, as convert --tune does (a bare --tune means ort) [default: ort].",
    bare="ort",
    timing=False,
)
DEFAULT_METHODS = "gdws,gkp,atmc,gdws+int8"


@click.command("compare")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    metavar="M[,M...]",
    help="Compression passes (gdws, gkp, atmc), each optionally followed by INT8 "
    "(gdws+int8), or int8 alone.",
)
@click.option(
    "--mac-reductions",
    type=NUMBERS,
    default="2,3",
    show_default=True,
    metavar="R[,R...]",
    help="MAC targets every method is run at.",
)
@DATA
@click.option(
    "--calib",
    metavar="SPEC",
    help="Data GDWS calibrates on and INT8 takes its samples from [default: --dataset].",
)
@ATTACKS
@DEVICE
@WORKERS
@ALLOCATION
@TUNE
@TIMING
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Folder [default: <stem>-compare]. Written atomically, like sweep's.",
)
def compare_command(model: Path, calib: Optional[str], out: Optional[Path], **flags: Any) -> None:
    """Convert MODEL (ONNX) with every method at every MAC target; measure MACs, weight
    storage, clean and robust accuracy (with 95 % intervals) and throughput (all models
    timed interleaved in one run); write compare.json, compare.png and the models to --out.
    """
    from gdws_deploy.options import ConvertOptions
    from gdws_deploy.pipeline.compare import parse_methods, run_compare
    from gdws_deploy.pipeline.sweep import model_stem

    methods = parse_methods(flags["methods"])
    flags["tune"] = flags["tune"] or "ort"
    check = CHECK.build(flags, "ort")
    calibration = check if calib is None else CHECK.build(flags, "ort", calib, check.attacks)
    out = out or Path(f"{model_stem(model)}-compare")
    errors = Console(stderr=True)
    options = TUNE.apply(ConvertOptions(), flags, flags["threads"])
    result = run_compare(
        model,
        out,
        check,
        methods=methods,
        mac_reductions=flags["mac_reductions"],
        calibration=calibration,
        bench=TIMING.build(flags),
        convert_options=ALLOCATION.apply(options, flags),
        progress=lambda message: errors.print(f"[dim]{message}[/]", highlight=False),
    )
    stdout_console().print(compare_table(result))
    stdout_console().print(
        f"wrote {out}/compare.json, {out}/compare.png and {len(result.points) - 1} models",
        markup=False,
        highlight=False,
    )
