"""`gdws-deploy finetune`: a short PGD adversarial fine-tune that keeps the model's graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from gdws_deploy.commands.args.attack import PerturbationArgs
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.commands.args.device import DeviceArgs
from gdws_deploy.commands.args.finetune import FinetuneArgs
from gdws_deploy.commands.render.console import stdout_console
from gdws_deploy.commands.render.finetune import report_table
from gdws_deploy.commands.render.progress import BatchProgress

TRAINING = FinetuneArgs()
DATA = DataArgs(batch_size=64)
PERTURBATION = PerturbationArgs(steps_flag="--attack-steps")
DEVICE = DeviceArgs(
    device_help="Where the mirror trains: auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N."
)


@click.command("finetune", short_help="Short PGD adversarial fine-tune; same graph, new weights.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output model [default: <stem>.finetuned.onnx next to MODEL].",
)
@TRAINING
@DATA
@PERTURBATION
@DEVICE
def finetune_command(model: Path, output: Optional[Path], **flags: Any) -> None:
    """Fine-tune MODEL (ONNX, converted or not) with PGD adversarial training through its
    torch mirror, to win back robustness a compression cut lost.

    Only the values of float weights change: every node, shape, type and integer constant,
    BatchNorm's running statistics and each weight that is exactly zero stay as they were,
    so the pass's structure (and speed) is kept. Fine-tune on training data (--dataset
    photos:train) and evaluate the result on test data (gdws-deploy eval OUT --dataset
    photos). Quantize after fine-tuning: INT8 (QDQ) models are refused.
    """
    from gdws_deploy.robustness.finetune import finetune_file

    output = output or model.with_name(f"{model.stem}.finetuned.onnx")
    existed = output.exists()
    attack = PERTURBATION.build(flags)
    options = TRAINING.build(flags, attack, DATA.sampling(flags))
    data = DATA.build(flags)
    with BatchProgress("fine-tuning") as progress:
        report = finetune_file(model, output, data, options, progress=progress)
    console = stdout_console()
    console.print(report_table(report))
    console.print(f"{'replaced' if existed else 'wrote'} {output}", markup=False, highlight=False)
