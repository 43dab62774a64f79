"""`gdws-deploy exits eval`: attacks on a multi-exit model, judged by its staged runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import click

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.commands.args.base import NUMBERS
from gdws_deploy.commands.render.console import stdout_console
from gdws_deploy.commands.render.progress import BatchProgress

ATTACK_HELP = (
    "pgd-final, pgd-average, max-average (Hu et al. 2020), exit-aware (the deployed gate "
    "made smooth), square (gradient-free, on the staged runtime)"
)


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, metavar="SPEC", help="Labelled images, e.g. photos.")
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option(
    "--attack",
    "attack_names",
    default="pgd-final,pgd-average,max-average,exit-aware,square",
    show_default=True,
    metavar="A[,A...]",
    help=ATTACK_HELP,
)
@click.option("--eps", default="4/255", show_default=True, help="l_inf budget.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--step-size", help="PGD step [default: 2.5*eps/steps].")
@click.option(
    "--tau",
    type=float,
    default=0.1,
    show_default=True,
    help="Temperature (nats) of exit-aware's smooth gate.",
)
@click.option(
    "--queries", type=click.IntRange(min=1), default=1000, show_default=True, help="Square's."
)
@click.option(
    "--thresholds",
    type=NUMBERS,
    metavar="T[,T...]",
    help="Entropy thresholds per early exit [default: the model's metadata].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, help="onnxruntime threads.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report.")
def exits_eval_command(
    model: Path,
    attack_names: str,
    eps: str,
    step_size: Optional[str],
    thresholds: Optional[List[float]],
    json_path: Optional[Path],
    **flags: Any,
) -> None:
    """Attack MODEL (multi-exit ONNX, calibrated) through its torch mirror; every verdict,
    exit and MAC count comes from the staged runtime with its thresholds."""
    from gdws_deploy.commands.render.exits_eval import exits_eval_table
    from gdws_deploy.robustness.attacks import parse_fraction
    from gdws_deploy.robustness.data import load_dataset
    from gdws_deploy.robustness.exit_attacks import ExitAttackSettings, evaluate_exits

    if json_path is not None:
        check_output_path(json_path, model)
    settings = ExitAttackSettings(
        eps=parse_fraction(eps, "--eps"),
        steps=flags["steps"],
        step_size=None if step_size is None else parse_fraction(step_size, "--step-size"),
        tau=flags["tau"],
        queries=flags["queries"],
    )
    attacks = [name.strip() for name in attack_names.split(",") if name.strip()]
    data = load_dataset(flags["dataset"], flags["limit"])
    with BatchProgress("attacking") as progress:
        report = evaluate_exits(
            model,
            data,
            attacks,
            settings,
            thresholds,
            flags["batch_size"],
            flags["seed"],
            flags["threads"],
            progress,
        )
    stdout_console().print(exits_eval_table(report))
    if json_path is not None:
        with atomic_open(json_path) as handle:
            json.dump(report.to_dict(), handle, indent=2)
            handle.write("\n")
