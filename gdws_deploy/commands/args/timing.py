"""sweep's --bench-batch, --duration, --rounds, --threads -> BenchSettings: how each
model of a sweep is timed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags

if TYPE_CHECKING:
    from gdws_deploy.pipeline.results import BenchSettings


class TimingArgs(ArgGroup):
    options = (
        click.option(
            "--bench-batch",
            type=click.IntRange(min=1),
            help="Batch to time at [default: 32, or MODEL's batch when its export fixes one].",
        ),
        click.option(
            "--duration",
            type=click.FloatRange(min=0, min_open=True),
            default=2.0,
            show_default=True,
            help="Seconds of timing per model.",
        ),
        click.option(
            "--rounds",
            type=click.IntRange(min=1),
            default=4,
            show_default=True,
            help="Interleaved timing blocks per model.",
        ),
        click.option(
            "--threads",
            type=click.IntRange(min=0),
            default=0,
            help="onnxruntime threads [default: one per core].",
        ),
    )

    @staticmethod
    def build(flags: Flags) -> BenchSettings:
        from gdws_deploy.pipeline.results import BenchSettings

        return BenchSettings(
            flags["bench_batch"], flags["duration"], flags["rounds"], flags["threads"]
        )
