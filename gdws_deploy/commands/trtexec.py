"""`gdws-deploy trtexec`: run NVIDIA's trtexec (or read its log) into the bench JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import click

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.perf_summary import PerformanceSummary


@click.command(
    "trtexec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the summary.")
@click.option(
    "--parse-log",
    type=click.Path(path_type=Path),
    help="Read a saved trtexec log instead of running trtexec.",
)
@click.option("--trtexec-path", help="The trtexec binary [default: $TRTEXEC, PATH, JetPack].")
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def trtexec_command(
    json_path: Optional[Path],
    parse_log: Optional[Path],
    trtexec_path: Optional[str],
    arguments: Sequence[str],
) -> None:
    """Run trtexec with ARGUMENTS and parse its performance summary (TensorRT 8.5 or 10).

    Example: gdws-deploy trtexec --json run.json --onnx=model.onnx --fp16
    """
    from gdws_deploy.runtime.trtexec_log import parse_trtexec_log
    from gdws_deploy.runtime.trtexec_run import run_trtexec

    if json_path is not None:
        check_output_path(json_path, *([parse_log] if parse_log else []))
    if parse_log is not None:
        if arguments:
            raise GdwsError("--parse-log reads a saved log; it takes no trtexec arguments")
        try:
            text = parse_log.read_text(errors="replace")
        except OSError as error:
            raise GdwsError(f"cannot read {parse_log}: {error.strerror}") from None
        summary = parse_trtexec_log(text)
        for line in summary.lines():
            click.echo(line)
        command = None
    else:
        run = run_trtexec(list(arguments), trtexec_path, echo=click.echo)
        summary, command = run.summary, run.command
        click.echo(_one_line(summary))
    if json_path is not None:
        with atomic_open(json_path) as handle:
            json.dump({"command": command, **summary.as_dict()}, handle, indent=2)


def _one_line(summary: PerformanceSummary) -> str:
    median = summary.metrics["latency"].median if "latency" in summary.metrics else float("nan")
    version = summary.tensorrt_version or "unknown version"
    return (
        f"gdws-deploy: trtexec (TensorRT {version}): {summary.throughput_qps:g} qps, "
        f"median latency {median:g} ms"
    )
