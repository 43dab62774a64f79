"""`gdws-deploy alphas`: per-channel weight error vectors of a model's eligible Convs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console

from gdws_deploy.atomic import check_output_path
from gdws_deploy.commands.args.attack import PerturbationArgs
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.commands.args.device import DeviceArgs
from gdws_deploy.commands.render.progress import BatchProgress

DATA = DataArgs(batch_size=32)  # memory grows with batch x classes x activations
PERTURBATION = PerturbationArgs()
DEVICE = DeviceArgs()


@click.command("alphas", short_help="Weight error vectors (alphas) for convert --alphas.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="npz to write."
)
@DATA
@PERTURBATION
@DEVICE
def alphas_command(model: Path, output: Path, **flags: Any) -> None:
    """Compute eq. (8) alphas of MODEL's eligible Convs for `convert --alphas`."""
    from gdws_deploy.robustness.alphas import compute_alphas, save_alphas

    check_output_path(output, model)
    perturbation = PERTURBATION.build(flags)
    data = DATA.build(flags)
    with BatchProgress("alphas") as progress:
        run = compute_alphas(model, data, perturbation, progress=progress, **DATA.sampling(flags))
    save_alphas(run, output, model)
    Console().print(
        f"wrote alphas of {len(run.alphas)} Conv(s) from {len(data)} samples to {output}",
        markup=False,
        highlight=False,
    )
