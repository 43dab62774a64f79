"""Flags shared by the TensorRT verbs (build, bench): shapes and checked numbers.

Values are parsed by the runtime's own parsers, which raise GdwsError, so a bad flag is one
line on stderr like every other user error. Imports nothing host-only: these verbs run in
the Jetson image.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, NamedTuple, Optional

import click

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.shapes import Shape, parse_shape_specs


class Parsed(click.ParamType):
    """A flag value parsed by `parse(text, flag)`, which raises GdwsError when it is bad."""

    def __init__(self, parse: Callable[[str, str], Any], name: str) -> None:
        self.parse = parse
        self.name = name

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        return self.parse(value, param.opts[0] if param is not None else self.name)


def _number(cast: type, minimum: float) -> Callable[[str, str], Any]:
    def parse(text: str, flag: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise GdwsError(f"{flag} must be a number, got {text!r}") from None
        if value < minimum:
            raise GdwsError(f"{flag} must be at least {minimum:g}, got {text}")
        return value

    return parse


COUNT = Parsed(_number(int, 1), "count")
INDEX = Parsed(_number(int, 0), "index")
SECONDS = Parsed(_number(float, 0), "number")
SHAPES = Parsed(parse_shape_specs, "NAME:DIMS[,...]")
SHAPE_KEYS = ("shapes", "min_shapes", "opt_shapes", "max_shapes")


class ShapeFlags(NamedTuple):
    """--shapes and the profile flags, each {input name: dims}."""

    shapes: Dict[str, Shape]
    min: Dict[str, Shape]
    opt: Dict[str, Shape]
    max: Dict[str, Shape]


def shape_options(command: Callable) -> Callable:
    """Add --shapes/--min-shapes/--opt-shapes/--max-shapes (trtexec's camelCase too).

    The command receives them together as `shape_flags`, a ShapeFlags.
    """

    @functools.wraps(command)
    def with_shape_flags(*args: Any, **kwargs: Any) -> Any:
        flags = ShapeFlags(*(kwargs.pop(key) for key in SHAPE_KEYS))
        return command(*args, shape_flags=flags, **kwargs)

    flags = (
        ("--shapes", "Fixed input shapes, e.g. input:1x3x32x32 (min = opt = max)."),
        ("--min-shapes", "Smallest shapes the engine accepts (dynamic batch)."),
        ("--opt-shapes", "Shapes TensorRT tunes for."),
        ("--max-shapes", "Largest shapes the engine accepts."),
    )
    for flag, text in reversed(flags):
        names = [flag] if flag == "--shapes" else [flag, flag[:-7] + "Shapes"]
        with_shape_flags = click.option(*names, type=SHAPES, default="", metavar="SPEC", help=text)(
            with_shape_flags
        )
    return with_shape_flags
