"""`gdws-deploy build`: ONNX -> TensorRT engine (or, with --parse-only, a parser verdict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import click
from rich.console import Console
from rich.table import Table

from gdws_deploy.commands.args.base import COUNT, INDEX
from gdws_deploy.commands.args.shapes import ShapeArgs
from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.shapes import Shape, format_shape

# Samples read from the dataset at a time; the calibrator regroups them to the profile.
CALIBRATION_READ_BATCH = 256
SHAPES = ShapeArgs()


@click.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Engine file to write.")
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels.")
@click.option("--int8", is_flag=True, help="Allow INT8 kernels (entropy calibration).")
@click.option("--calib", metavar="DATASET", help="Calibration data, e.g. digits or npz:PATH.")
@click.option("--calib-batches", type=COUNT, help="Calibrate on at most N batches.")
@click.option("--calib-cache", type=click.Path(path_type=Path), help="Calibration cache file.")
@click.option("--dla-core", "--useDLACore", type=INDEX, help="Run on DLA core N (Xavier: 0, 1).")
@click.option(
    "--allow-gpu-fallback",
    "--allowGPUFallback",
    is_flag=True,
    help="Run the layers the DLA cannot run on the GPU (they are listed).",
)
@click.option("--workspace", type=COUNT, metavar="MiB", help="Workspace memory pool limit.")
@click.option(
    "--timing-cache",
    "--timingCacheFile",
    type=click.Path(path_type=Path),
    help="Timing cache file: read if present, updated after the build.",
)
@SHAPES
@click.option("--verbose", is_flag=True, help="Print TensorRT's log.")
@click.option("--parse-only", is_flag=True, help="Only run TensorRT's ONNX parser.")
def build_command(
    model: Path,
    output: Optional[Path],
    fp16: bool,
    int8: bool,
    calib: Optional[str],
    calib_batches: Optional[int],
    calib_cache: Optional[Path],
    dla_core: Optional[int],
    allow_gpu_fallback: bool,
    workspace: Optional[int],
    timing_cache: Optional[Path],
    verbose: bool,
    parse_only: bool,
    **flags: Any,
) -> None:
    """Build a TensorRT engine from MODEL (ONNX), with metadata JSON next to it.

    Flags follow trtexec (--fp16, --int8, --useDLACore, --shapes, --minShapes, ...).
    """
    from gdws_deploy.runtime import engine_build

    console = Console()
    if parse_only:
        _parse_only(model, verbose, console)
        return
    if output is None:
        raise GdwsError("give the engine file with -o/--output (or use --parse-only)")
    shape_flags = SHAPES.build(flags)
    options = engine_build.BuildOptions(
        fp16=fp16,
        int8=int8,
        calibration_cache=str(calib_cache) if calib_cache else None,
        calibration_batches=calib_batches,
        dla_core=dla_core,
        allow_gpu_fallback=allow_gpu_fallback,
        workspace_mib=workspace,
        timing_cache=str(timing_cache) if timing_cache else None,
        shapes=shape_flags.shapes,
        min_shapes=shape_flags.min,
        opt_shapes=shape_flags.opt,
        max_shapes=shape_flags.max,
        verbose=verbose,
    )
    options.validate()
    if calib is not None and not int8:
        raise GdwsError("--calib only applies together with --int8")
    batches = _calibration_batches(calib) if calib is not None else None
    report = engine_build.build_engine(str(model), str(output), options, batches, _echo_err)
    console.print(_build_table(report))


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


def _calibration_batches(spec: str) -> Iterable[Any]:
    """(images, labels) batches of a gdws_deploy.robustness.data dataset; the feed regroups them."""
    from gdws_deploy.robustness.data import load_dataset

    return load_dataset(spec).batches(CALIBRATION_READ_BATCH)


def _onnx_nodes(model: Path) -> List[Tuple[int, str, str]]:
    """(index, name, op) of every node when the onnx package is here; none on the device."""
    try:
        import onnx
    except ImportError:
        return []
    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception:  # the TensorRT parser reports unreadable files itself
        return []
    return [(i, node.name, node.op_type) for i, node in enumerate(graph.node)]


def _parse_only(model: Path, verbose: bool, console: Console) -> None:
    from gdws_deploy.runtime.engine_build import parse_onnx

    report = parse_onnx(str(model), _onnx_nodes(model), verbose, _echo_err)
    console.print(f"{report.tensorrt} ONNX parser, {model}:")
    for kind, tensors in (("input", report.inputs), ("output", report.outputs)):
        for name, shape in tensors.items():
            console.print(f"  {kind} {name}: {format_shape(shape).replace('-1', '?')}")
    if not report.issues:
        console.print(f"accepted: {report.layers} TensorRT layers")
        return
    table = Table(title="nodes TensorRT cannot import", title_justify="left")
    for column in ("node", "name", "op", "reason"):
        table.add_column(column)
    for issue in report.issues:
        table.add_row(str(issue.node), issue.name, issue.operator, issue.message)
    console.print(table)
    raise GdwsError(f"TensorRT's ONNX parser rejects {len(report.issues)} node(s) of {model}")


def _build_table(report: Any) -> Table:
    table = Table(title=f"engine {report.plan}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows: Dict[str, str] = {
        "TensorRT": str(report.tensorrt),
        "precision": report.precision,
        "size": f"{report.plan_bytes / 2**20:.2f} MiB",
        "build time": f"{report.seconds:.1f} s",
        "metadata": str(report.metadata),
    }
    for name, profile in report.profiles.items():
        rows[f"input {name}"] = _profile_text(profile)
    if report.calibration_batches:
        rows["calibration"] = f"{report.calibration_batches} batches"
    if report.gpu_layers:
        shown = ", ".join(report.gpu_layers[:8]) + (" ..." if len(report.gpu_layers) > 8 else "")
        rows["DLA -> GPU fallback"] = f"{len(report.gpu_layers)} layers: {shown}"
    for key, value in rows.items():
        table.add_row(key, value)
    return table


def _profile_text(profile: Tuple[Shape, Shape, Shape]) -> str:
    low, opt, high = (format_shape(s) for s in profile)
    return low if low == high else f"min {low}, opt {opt}, max {high}"
