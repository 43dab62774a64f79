"""--shapes and the profile flags of the TensorRT verbs (build, bench) -> ShapeFlags.

Values are parsed by the runtime's own parser, which raises GdwsError, so a bad flag is one
line on stderr. Imports nothing host-only: these verbs run in the Jetson image (Python 3.8).
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import click

from gdws_deploy.commands.args.base import ArgGroup, Decorator, Flags, Parsed
from gdws_deploy.runtime.shapes import Shape, parse_shape_specs

SHAPES = Parsed(parse_shape_specs, "NAME:DIMS[,...]")


class ShapeFlags(NamedTuple):
    """--shapes and the profile flags, each {input name: dims}."""

    shapes: Dict[str, Shape]
    min: Dict[str, Shape]
    opt: Dict[str, Shape]
    max: Dict[str, Shape]


def _shape_option(flag: str, text: str) -> Decorator:
    names = [flag] if flag == "--shapes" else [flag, flag[:-7] + "Shapes"]  # trtexec's spelling
    return click.option(*names, type=SHAPES, default="", metavar="SPEC", help=text)


class ShapeArgs(ArgGroup):
    """--shapes, --min-shapes, --opt-shapes, --max-shapes (trtexec's camelCase too)."""

    options = (
        _shape_option("--shapes", "Fixed input shapes, e.g. input:1x3x32x32 (min = opt = max)."),
        _shape_option("--min-shapes", "Smallest shapes the engine accepts (dynamic batch)."),
        _shape_option("--opt-shapes", "Shapes TensorRT tunes for."),
        _shape_option("--max-shapes", "Largest shapes the engine accepts."),
    )

    @staticmethod
    def build(flags: Flags) -> ShapeFlags:
        return ShapeFlags(
            flags["shapes"], flags["min_shapes"], flags["opt_shapes"], flags["max_shapes"]
        )
