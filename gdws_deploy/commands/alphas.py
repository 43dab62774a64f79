"""`gdws-deploy alphas`: per-channel weight error vectors of a model's eligible Convs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from rich.console import Console

from gdws_deploy.atomic import check_output_path
from gdws_deploy.commands.eval import BatchProgress, dataset_options


@click.command("alphas", short_help="Weight error vectors (alphas) for convert --alphas.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="npz to write."
)
@dataset_options(batch_size=32)  # memory grows with batch x classes x activations
@click.option(
    "--attack",
    type=click.Choice(["pgd", "none"]),
    default="pgd",
    show_default=True,
    help="Perturb the samples with PGD first, or use them clean.",
)
@click.option("--norm", type=click.Choice(["linf", "l2", "l1"]), default="linf", show_default=True)
@click.option("--eps", default="8/255", show_default=True, help="PGD budget (fractions allowed).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--step-size", help="PGD step [default: 2.5*eps/steps, 2/255 for the defaults].")
def alphas_command(
    model: Path,
    output: Path,
    dataset: str,
    limit: Optional[int],
    batch_size: int,
    mean: Optional[str],
    std: Optional[str],
    seed: int,
    attack: str,
    norm: str,
    eps: str,
    steps: int,
    step_size: Optional[str],
) -> None:
    """Compute eq. (8) alphas of MODEL's eligible Convs for `convert --alphas`."""
    from gdws_deploy.robustness.alphas import compute_alphas, save_alphas
    from gdws_deploy.robustness.attacks import make_attacks, parse_channels, parse_fraction
    from gdws_deploy.robustness.data import load_dataset

    check_output_path(output, model)
    perturbation = None
    if attack == "pgd":
        budget = {norm: parse_fraction(eps, "--eps")}
        step = {norm: parse_fraction(step_size, "--step-size")} if step_size else None
        (perturbation,) = make_attacks(f"pgd-{norm}", budget, steps, step)
    data = load_dataset(dataset, limit)
    with BatchProgress("alphas") as progress:
        run = compute_alphas(
            model,
            data,
            perturbation,
            batch_size=batch_size,
            mean=parse_channels(mean, "--mean"),
            std=parse_channels(std, "--std"),
            seed=seed,
            progress=progress,
        )
    save_alphas(run, output, model)
    Console().print(
        f"wrote alphas of {len(run.alphas)} Conv(s) from {len(data)} samples to {output}",
        markup=False,
        highlight=False,
    )
