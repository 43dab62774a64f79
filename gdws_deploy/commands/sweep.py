"""`gdws-deploy sweep`: convert at several targets, measure robustness and speed, plot."""

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
from gdws_deploy.commands.args.method import MethodArgs
from gdws_deploy.commands.args.timing import TimingArgs
from gdws_deploy.commands.args.tune import TuneArgs
from gdws_deploy.commands.args.workers import WorkersArgs
from gdws_deploy.commands.render.console import stdout_console
from gdws_deploy.commands.render.sweep import search_table, sweep_summary, sweep_table

DATA, ATTACKS, ALLOCATION, TIMING = (
    DataArgs(batch_size=128),
    AttackArgs(),
    AllocationArgs(),
    TimingArgs(),
)
CHECK = CheckArgs(DATA, ATTACKS)
DEVICE, WORKERS = DeviceArgs(providers=True), WorkersArgs()
METHOD = MethodArgs(allowed=("dataset",))
TUNE = TuneArgs(
    lowering_help="How GDWS layers are written (see convert --help).",
    tune_help="Time each layer's forms on this backend at --bench-batch and keep the fastest, "
    "never slower than MODEL, as convert --tune does (a bare --tune means ort).",
    bare="ort",
    timing=False,
)


@click.command("sweep")
@click.argument("model", type=click.Path(path_type=Path))
@DATA
@click.option(
    "--calib",
    metavar="SPEC",
    help="Data that calibrates the conversion and judges --max-robust-drop [default: --dataset].",
)
@ATTACKS
@DEVICE
@WORKERS
@METHOD
@click.option(
    "--mac-reductions", type=NUMBERS, metavar="R[,R...]", help="MAC targets [default: 1.5,2,3,4]."
)
@click.option(
    "--betas", type=NUMBERS, metavar="B[,B...]", help="Per-layer LEGO bounds instead (with alphas)."
)
@ALLOCATION
@click.option(
    "--alphas", type=click.Path(path_type=Path), help="npz of alphas [default: computed]."
)
@click.option(
    "--max-robust-drop",
    type=float,
    metavar="D",
    help="Also find the largest MAC reduction losing at most D robust accuracy (0.01: 1 point).",
)
@TUNE
@click.option("--backend", type=click.Choice(["ort"]), default="ort", show_default=True)
@TIMING
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Folder [default: <stem>-sweep]. Written atomically: the files appear there only "
    "when the whole sweep succeeds; a failed or interrupted sweep leaves nothing behind.",
)
def sweep_command(
    model: Path, calib: Optional[str], backend: str, out: Optional[Path], **flags: Any
) -> None:
    """Convert MODEL (ONNX) at several targets; measure MACs, parameters, clean and robust
    accuracy and throughput of each; write sweep.json, sweep.png and the models to --out.
    """
    from gdws_deploy.options import ConvertOptions
    from gdws_deploy.pipeline.sweep import model_stem, run_sweep

    options = METHOD.apply(ConvertOptions(alphas=flags["alphas"]), flags)
    check = CHECK.build(flags, backend)
    calibration = check if calib is None else CHECK.build(flags, backend, calib, check.attacks)
    out = out or Path(f"{model_stem(model)}-sweep")
    errors = Console(stderr=True)
    result = run_sweep(
        model,
        out,
        check,
        calibration=calibration,
        mac_reductions=flags["mac_reductions"],
        betas=flags["betas"],
        max_robust_drop=flags["max_robust_drop"],
        bench=TIMING.build(flags),
        convert_options=ALLOCATION.apply(TUNE.apply(options, flags, flags["threads"]), flags),
        progress=lambda message: errors.print(f"[dim]{message}[/]", highlight=False),
    )
    console = stdout_console()
    console.print(sweep_table(result))
    if result.operating_point is not None:
        console.print(search_table(result.operating_point))
    for line in sweep_summary(result, out):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
