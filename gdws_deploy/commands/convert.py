"""`gdws-deploy convert`: rewrite a model's KxK convs into GDWS form, layer table included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click
from rich.console import Console
from rich.markup import escape

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.commands.args.attack import AttackArgs
from gdws_deploy.commands.args.calibration import CalibrationArgs
from gdws_deploy.commands.args.check import CheckArgs
from gdws_deploy.commands.args.convert import ConvertArgs
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.commands.args.device import DeviceArgs
from gdws_deploy.commands.args.finetune import SearchFinetuneArgs
from gdws_deploy.commands.args.int8 import Int8Args
from gdws_deploy.commands.args.workers import WorkersArgs
from gdws_deploy.commands.render.console import stdout_console
from gdws_deploy.commands.render.convert import layer_table, totals, warnings
from gdws_deploy.commands.render.progress import LayerProgress
from gdws_deploy.commands.render.sweep import rule_table, search_table
from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.int8 import QUANTIZE_ONLY

DATA, ATTACKS, CONVERT = DataArgs(batch_size=128, required=False), AttackArgs(), ConvertArgs()
CALIBRATION = CalibrationArgs(CheckArgs(DATA, ATTACKS))
SEARCH_FINETUNE = SearchFinetuneArgs()
DEVICE, WORKERS, INT8 = DeviceArgs(providers=True), WorkersArgs(), Int8Args()


@click.command("convert")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output model [default: <stem>.<method>.onnx next to MODEL, .<method>.int8.onnx "
    "with --int8].",
)
@CONVERT.method
@CONVERT.target
@CONVERT.atmc
@click.option("--alphas", type=click.Path(path_type=Path), help="npz of channel weights per Conv.")
@CONVERT.selection
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path), help="Also write the table as JSON."
)
@click.option("--no-parity", is_flag=True, help="Skip the onnxruntime parity check.")
@CONVERT.tune
@CONVERT.speed_goal
@CONVERT.allocation
@INT8
@CALIBRATION
@SEARCH_FINETUNE
@DATA
@ATTACKS
@DEVICE
@WORKERS
def convert_command(
    model: Path, output: Optional[Path], report_path: Optional[Path], **flags: Any
) -> None:
    """Rewrite the KxK convolutions of MODEL (ONNX) into GDWS form (or prune their kernels
    in groups: --method gkp; or factor their filter banks at low rank: --method atmc).

    Give one target: --beta, --budget, --mac-reduction, --speedup (with --tune; may join
    --mac-reduction; or --speed-ratio with it), or --max-robust-drop with --dataset. With
    --dataset, a MAC target is calibrated on that data (measured loss curves for the default
    allocation). Prints one row per Conv (its lowering too) and the parity of the result
    against MODEL in onnxruntime. --int8 then quantizes the result to INT8 on --calib
    (--method int8: quantization alone), and says how far its logits moved.
    """
    from gdws_deploy.pipeline.convert import convert_file

    CALIBRATION.validate(flags)
    options = INT8.apply(CONVERT.build(flags, searched=flags["max_robust_drop"] is not None), flags)
    if options.int8 and flags["max_robust_drop"] is not None:
        raise GdwsError(
            "--max-robust-drop searches float conversions: quantize its output with --method int8"
        )
    quantized = options.int8 and options.method != QUANTIZE_ONLY
    output = output or model.with_name(
        f"{model.stem}.{options.method}{'.int8' if quantized else ''}.onnx"
    )
    if report_path is not None:
        check_output_path(report_path, model, output)
        if report_path.resolve() == output.resolve():
            raise GdwsError("--report must differ from the output model path")
    errors, console = Console(stderr=True), stdout_console()
    existed = output.exists()
    check, search, search_key = CALIBRATION.build(flags), None, "search"
    refine = SEARCH_FINETUNE.build(flags, check)
    if check is None:
        with LayerProgress(errors) as progress:
            report, rewritten = convert_file(
                model, output, options, progress=progress, stage=progress.stage
            )
    else:  # torch and the attacks load only when calibrating
        from gdws_deploy.pipeline.calibrated import DropNotKeptError, convert_calibrated
        from gdws_deploy.pipeline.rule_choice import RuleChoice

        def said(probe) -> None:
            errors.print(f"[dim]probe {escape(probe.summary)}[/]")

        try:
            search, report, rewritten = convert_calibrated(
                model,
                output,
                options,
                check,
                flags["max_robust_drop"],
                max_clean_drop=flags["max_clean_drop"],
                on_probe=said,
                stage=lambda text: errors.print(f"[dim]{text}[/]"),
                refine=refine,
            )
        except DropNotKeptError as error:
            console.print(search_table(error.point))
            raise
        if isinstance(search, RuleChoice):
            console.print(rule_table(search))
            search_key = "rule_choice"
        elif search is not None:
            console.print(search_table(search))
        if refine is not None:
            console.print(
                f"every probe was fine-tuned {flags['finetune']} steps on "
                f"{flags['finetune_data']} before it was judged; {output} is fine-tuned too",
                markup=False,
                highlight=False,
            )
    console.print(layer_table(report))
    console.print(totals(report))
    warnings(report, options, rewritten, errors)
    if report_path is not None:
        with atomic_open(report_path) as handle:
            record = {**report.to_dict(), "input": str(model), "output": str(output)}
            if search is not None:
                record[search_key] = search.to_dict()
            json.dump(record, handle, indent=2)
    verb = "replaced" if existed else "wrote"
    if report.int8:
        done = f"{verb} {output} (INT8)"
    elif report.already_met:
        done = f"target already met ({report.target}): {verb} {output} unchanged"
    else:
        done = f"{verb} {output}"
    console.print(done, markup=False, highlight=False)
