"""`gdws-deploy exits`: deploy multi-exit models (split, calibrate, bench; eval attacks them).

`eval` lives in commands/exits_eval.py and is imported only when invoked, like every verb.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any, List, Optional

import click

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.commands.args.exits import ExitDataArgs
from gdws_deploy.commands.args.timing import TimingArgs
from gdws_deploy.commands.render.console import stdout_console
from gdws_deploy.commands.render.exits import (
    bench_record,
    bench_table,
    calibration_table,
    split_table,
)

# subcommand -> "module:click command", imported on first use
LAZY = {"eval": "gdws_deploy.commands.exits_eval:exits_eval_command"}


class ExitsGroup(click.Group):
    """The group's own subcommands plus the lazily imported ones (LAZY)."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted({*super().list_commands(ctx), *LAZY})

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in LAZY:
            return super().get_command(ctx, name)
        module, attribute = LAZY[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group("exits", cls=ExitsGroup)
def exits_command() -> None:
    """Multi-exit models (outputs exit_0, exit_1, ..., final): split into stages, calibrate
    exit thresholds to a MAC budget, benchmark the staged runtime."""


DATA = ExitDataArgs(batch_size=256)
TIMING = TimingArgs()
BACKEND = click.option(
    "--backend",
    type=click.Choice(["ort", "trt"]),
    default="ort",
    show_default=True,
    help="trt: the stage folder's engines (<stage>.plan, full.plan, from `gdws-deploy build`).",
)


@exits_command.command("split")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Folder [default: <stem>-stages next to MODEL]. Written atomically.",
)
def split_command(model: Path, output: Optional[Path]) -> None:
    """Cut MODEL (ONNX, outputs exit_0, ..., final) into one ONNX model per exit, plus the
    single-pass model full.onnx and manifest.json (tensors, thresholds, MACs)."""
    from gdws_deploy.exits.split import split_model, write_split

    out = output or model.with_name(f"{_stem(model)}-stages")
    split = split_model(model)
    write_split(split, out, str(model))
    stdout_console().print(split_table(split))
    click.echo(f"wrote {out}")


@exits_command.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output model [default: <stem>.exits.onnx next to MODEL].",
)
@click.option(
    "--budget",
    type=float,
    required=True,
    help="Expected MACs as a share of the single-pass model's, in (0, 1] (0.7: 30 % fewer).",
)
@click.option(
    "--scheme",
    type=click.Choice(["search", "quantile"]),
    default="search",
    show_default=True,
    help="quantile: the paper's one share leaving at every exit; search: per-exit grids.",
)
@DATA
@click.option("--threads", type=click.IntRange(min=0), default=0, help="onnxruntime threads.")
def calibrate_command(
    model: Path, output: Optional[Path], budget: float, scheme: str, threads: int, **flags: Any
) -> None:
    """Choose entropy thresholds for MODEL's exits on clean --dataset images: the most
    accurate whose expected MACs are at most --budget of the single-pass model's; write
    MODEL with them in its metadata."""
    from gdws_deploy.exits.calibrate import calibrate_model, check_budget

    check_budget(budget)
    out = output or model.with_name(f"{_stem(model)}.exits.onnx")
    images, labels, spec = DATA.build(flags)
    chosen, policy = calibrate_model(
        model,
        out,
        images,
        labels,
        budget,
        dataset=spec,
        scheme=scheme,
        batch_size=flags["batch_size"],
        threads=threads,
    )
    stdout_console().print(calibration_table(chosen, policy))
    click.echo(f"wrote {out}")


@exits_command.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@DATA
@BACKEND
@TIMING
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results.")
def bench_command(model: Path, backend: str, json_path: Optional[Path], **flags: Any) -> None:
    """Run MODEL (calibrated multi-exit ONNX, or the folder `exits split` wrote) stage by
    stage on --dataset and time it against its single-pass model, interleaved: latency per
    batch, images/s, exits taken, expected MACs, accuracy."""
    from gdws_deploy.runtime.benchmark import BenchOptions
    from gdws_deploy.runtime.staged_bench import bench_exits

    settings = TIMING.build(flags)
    settings.validate()
    if json_path is not None:
        check_output_path(json_path, model)
    images, labels, _ = DATA.build(flags)
    options = BenchOptions(duration_s=settings.duration_s, iterations=settings.rounds)
    batch = settings.batch or flags["batch_size"]
    with contextlib.ExitStack() as stack:
        staged = stack.enter_context(_staged(model, backend, settings.threads))
        full = stack.enter_context(_single_pass(staged.full, backend, settings.threads))
        result = bench_exits(staged, full.infer, images, labels, batch, options, settings.rounds)
    stdout_console().print(bench_table(result, backend))
    click.echo(
        f"expected MACs {result.expected_share:.3f} of the single-pass model's; "
        f"measured speed-up {result.speedup:.3f}x"
    )
    if json_path is not None:
        with atomic_open(json_path) as handle:
            json.dump(
                {"model": str(model), "backend": backend, **bench_record(result)}, handle, indent=2
            )


def _single_pass(full: Any, backend: str, threads: int) -> Any:
    """The single-pass model's runner (not yet active: a context manager)."""
    if backend == "trt":
        from gdws_deploy.runtime.trt_runner import TrtRunner

        return TrtRunner(full)
    from gdws_deploy.runtime.runner import OrtRunner

    return OrtRunner(full, threads=threads)


def _stem(model: Path) -> str:
    return model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name


def _staged(model: Path, backend: str, threads: int) -> Any:
    """The staged runtime of a stage folder (all the device needs) or, on the host, of a
    multi-exit ONNX file split in memory (which needs the onnx package)."""
    if model.is_dir():
        from gdws_deploy.runtime.staged import StagedModel

        return StagedModel.open(model, backend, threads=threads)
    from gdws_deploy.exits.split import open_staged

    return open_staged(model, backend, threads=threads)
