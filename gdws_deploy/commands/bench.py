"""`gdws-deploy bench`: trtexec-style timing of an engine or ONNX model, or two interleaved."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import click
from rich.console import Console
from rich.table import Table

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.commands.args.base import COUNT, INDEX, SECONDS, Parsed
from gdws_deploy.commands.args.device import DeviceArgs
from gdws_deploy.commands.args.shapes import ShapeArgs
from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.benchmark import (
    BenchOptions,
    BenchResult,
    as_json,
    benchmark,
    benchmark_pair,
    input_mismatch,
    throughput_ratio,
)
from gdws_deploy.runtime.perf_summary import parse_percentiles, prolog_lines, trace_lines
from gdws_deploy.runtime.runner import Runner
from gdws_deploy.runtime.shapes import Shape

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
PERCENTILES = Parsed(lambda text, flag: parse_percentiles(text), "P1,P2,...")
SHAPES = ShapeArgs()
DEVICE = DeviceArgs(
    providers=True,
    device_help="Where onnxruntime runs: auto (CUDA where onnxruntime-gpu is installed), cpu, "
    "cuda or cuda:N.",
)


@click.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--backend",
    type=click.Choice(["auto", "ort", "trt"]),
    default="auto",
    show_default=True,
    help="auto: TensorRT for engines, onnxruntime for .onnx.",
)
@click.option("--compare", type=click.Path(path_type=Path), help="Time OTHER interleaved.")
@click.option("--rounds", type=COUNT, default=10, show_default=True, help="Blocks per model.")
@click.option("--warmUp", "warmup", type=SECONDS, default=200.0, show_default=True, help="ms")
@click.option("--iterations", type=COUNT, default=10, show_default=True)
@click.option("--duration", type=SECONDS, default=3.0, show_default=True, help="s")
@click.option("--avgRuns", "avg_runs", type=COUNT, default=10, show_default=True)
@click.option("--percentile", type=PERCENTILES, default="90,95,99", show_default=True)
@click.option("--batch", type=COUNT, help="Batch size on a dynamic first axis [default: 1].")
@SHAPES
@click.option("--useCudaGraph", "use_cuda_graph", is_flag=True, help="TensorRT: CUDA graph.")
@click.option("--noDataTransfers", "no_data_transfers", is_flag=True, help="TensorRT: no copies.")
@click.option("--fp16", is_flag=True, help="TensorRT from ONNX: build with FP16.")
@click.option(
    "--threads",
    type=INDEX,
    default=0,
    metavar="N",
    help="onnxruntime intra-op threads [default: 0, onnxruntime's choice].",
)
@DEVICE
@click.option("--verbose", is_flag=True, help="Print trtexec's trace details too.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the summary.")
def bench_command(
    model: Path,
    backend: str,
    compare: Optional[Path],
    rounds: int,
    warmup: float,
    iterations: int,
    duration: float,
    avg_runs: int,
    percentile: tuple,
    batch: Optional[int],
    use_cuda_graph: bool,
    no_data_transfers: bool,
    fp16: bool,
    threads: int,
    verbose: bool,
    json_path: Optional[Path],
    **flags: Any,
) -> None:
    """Time MODEL (engine or ONNX) the way trtexec does and print its performance summary.

    With --compare OTHER both run in this process in alternating blocks and the throughput
    ratio OTHER / MODEL is printed (the speed-up of a converted model over the original).
    """
    shape_flags = SHAPES.build(flags)
    if shape_flags.min or shape_flags.opt or shape_flags.max:
        raise GdwsError("bench runs at one shape: use --shapes (profiles are for `build`)")
    shapes = shape_flags.shapes
    options = BenchOptions(
        warmup, iterations, duration, avg_runs, percentile, batch, use_cuda_graph, no_data_transfers
    )
    options.validate()
    if json_path is not None:
        check_output_path(json_path, model, *([compare] if compare else []))
    models = [model] if compare is None else [model, compare]
    with contextlib.ExitStack() as stack:
        runners = [
            stack.enter_context(_open_runner(m, backend, fp16, threads, shapes, batch, flags))
            for m in models
        ]
        if compare is None:
            results = [benchmark(runners[0], options, shapes)]
        else:
            results = benchmark_pair(runners, options, shapes, rounds)
    backends = [r.name for r in runners]
    for path, result in zip(models, results):
        if compare is not None:
            click.echo(f"=== {path} ({result.summary.device}) ===")
        _print_result(result, options, verbose)
    report: Dict[str, Any] = as_json(results[0], str(model), backends[0], options)
    if compare is not None:
        ratio = throughput_ratio(results[0].summary, results[1].summary)
        warning = input_mismatch([model.name, compare.name], results)
        Console().print(_comparison_table(models, backends, results))
        if warning is not None:
            click.echo(warning, err=True)
        click.echo(f"Throughput ratio ({compare.name} / {model.name}): {ratio:.3f}x")
        report = {
            "model": report,
            "compare": as_json(results[1], str(compare), backends[1], options),
            "throughput_ratio": ratio,
            "rounds": rounds,
            "warnings": [] if warning is None else [warning],
        }
    if json_path is not None:
        with atomic_open(json_path) as handle:
            json.dump(report, handle, indent=2)


def _print_result(result: BenchResult, options: BenchOptions, verbose: bool) -> None:
    lines: List[str] = prolog_lines(result.trace)
    if verbose:
        lines += trace_lines(result.trace, options.avg_runs, result.summary.device)
    for line in [*lines, *result.summary.lines()]:
        click.echo(line)


def _backend_for(model: Path, backend: str) -> str:
    if backend != "auto":
        return backend
    if model.suffix.lower() == ".onnx":
        return "ort"
    if model.suffix.lower() in ENGINE_SUFFIXES:
        return "trt"
    raise GdwsError(f"cannot tell the backend of {model}: use --backend ort|trt")


@contextlib.contextmanager
def _open_runner(
    model: Path,
    backend: str,
    fp16: bool,
    threads: int,
    shapes: Dict[str, Shape],
    batch: Optional[int],
    flags: Dict[str, Any],
) -> Iterator[Runner]:
    """An active runner for `model` (onnxruntime's on the providers of --device and
    --providers); an ONNX model on the TensorRT backend is built first."""
    if not model.is_file():
        raise GdwsError(f"cannot read {model}: no such file")
    kind = _backend_for(model, backend)
    is_onnx = model.suffix.lower() == ".onnx"
    if kind == "ort":
        if not is_onnx:
            raise GdwsError(f"onnxruntime runs ONNX models, not {model}; use --backend trt")
        if fp16:
            raise GdwsError("--fp16 applies to the TensorRT backend (--backend trt)")
        if importlib.util.find_spec("onnxruntime") is None:
            raise GdwsError("onnxruntime is not installed here; use --backend trt")
        from gdws_deploy.runtime.providers import ort_providers
        from gdws_deploy.runtime.runner import OrtRunner

        providers = ort_providers(flags["device"], DEVICE.providers(flags))
        with OrtRunner(model, providers=providers, threads=threads) as runner:
            yield runner
        return
    from gdws_deploy.runtime.trt_runner import TrtRunner

    with tempfile.TemporaryDirectory(prefix="gdws-bench-") as folder:
        engine = model
        if is_onnx:
            from gdws_deploy.runtime.engine_build import BuildOptions, build_engine

            engine = Path(folder) / f"{model.stem}.plan"
            options = BuildOptions(fp16=fp16, shapes=shapes, batch=batch or 1)
            build_engine(str(model), str(engine), options)
        with TrtRunner(engine) as runner:
            yield runner


def _comparison_table(models: List[Path], backends: List[str], results: List[BenchResult]) -> Table:
    table = Table(title="interleaved comparison", title_justify="left")
    for column in ("model", "backend", "qps", "images/s", "median latency (ms)"):
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    for path, backend, result in zip(models, backends, results):
        summary = result.summary
        images = summary.images_per_s
        table.add_row(
            path.name,
            backend,
            f"{summary.throughput_qps:.4g}",
            "-" if images is None else f"{images:.4g}",
            f"{summary.metrics['latency'].median:.4g}",
        )
    return table
