"""`gdws-deploy eval`: clean and robust accuracy of a model as its backend runs it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

import click
from rich.console import Console

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.commands.args.attack import AttackArgs
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.commands.args.device import DeviceArgs
from gdws_deploy.commands.args.workers import WorkersArgs
from gdws_deploy.commands.render.eval import report_table
from gdws_deploy.commands.render.progress import BatchProgress

DATA = DataArgs(batch_size=128)
ATTACKS = AttackArgs()
DEVICE = DeviceArgs(providers=True)
WORKERS = WorkersArgs(resume=True)


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@DATA
@click.option(
    "--backend",
    default="ort",
    show_default=True,
    help="Runtime that gives the verdict: ort, or trt with --engine.",
)
@click.option("--engine", type=click.Path(path_type=Path), help="TensorRT engine (.plan).")
@ATTACKS
@click.option(
    "--transfer-from",
    type=click.Path(path_type=Path),
    metavar="ORIGINAL",
    help="Also judge each sample on the attacks' examples crafted on ORIGINAL (the model "
    "MODEL was converted from); robust only where MODEL survives both. A conversion that only "
    "hides its gradients from the attacks gains nothing.",
)
@DEVICE
@WORKERS
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Write the report: RobustBench-style (model, data, n, norm, eps, attacks, clean, "
    "robust, per_attack) and the details.",
)
def eval_command(
    model: Path,
    backend: str,
    engine: Optional[Path],
    transfer_from: Optional[Path],
    json_path: Optional[Path],
    **flags: Any,
) -> None:
    """Attack MODEL (ONNX) through its torch mirror and judge it on the deployed backend."""
    from gdws_deploy.robustness import transfer
    from gdws_deploy.robustness.evaluate import evaluate
    from gdws_deploy.robustness.shards import evaluate_sharded

    attacks = ATTACKS.build(flags)
    inputs = [model, *([engine] if engine else []), *([transfer_from] if transfer_from else [])]
    sharding = WORKERS.build(flags)
    for output in (json_path, sharding and sharding.resume):
        if output:
            check_output_path(output, *inputs)
    data = DATA.build(flags)
    sampling = DATA.sampling(flags)
    originals_examples = None
    if transfer_from is not None:
        originals_examples = transfer.transfer_from(transfer_from, data, attacks, **sampling)
    with BatchProgress("attacking") as progress:
        if sharding is None:
            run = functools.partial(evaluate, engine=engine)
        else:
            run = functools.partial(evaluate_sharded, sharding=sharding)
        report = run(
            model,
            data,
            attacks,
            backend=backend,
            progress=progress,
            providers=DEVICE.providers(flags),
            transfer=originals_examples,
            **sampling,
        )
    Console().print(report_table(report))
    if json_path is not None:
        with atomic_open(json_path) as handle:
            json.dump({**report.robustbench(), **report.to_dict()}, handle, indent=2)
