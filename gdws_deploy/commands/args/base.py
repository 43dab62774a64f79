"""What every argument group shares: applying its flags, and flag values parsed into GdwsError.

Imports nothing host-only: the TensorRT verbs (build, bench) use it in the Jetson image,
under Python 3.8.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence

import click

from gdws_deploy.errors import GdwsError

# The parsed flag values of a verb, by click parameter name.
Flags = Mapping[str, Any]
Decorator = Callable[[Callable], Callable]


class ArgGroup:
    """A set of flags declared once; used as a decorator, it adds them to a click command.

    Subclasses fill `options` (click.option decorators, in --help order) and add a
    `build(flags)` that turns the values into the API object the flags describe.
    """

    options: Sequence[Decorator] = ()

    def __call__(self, command: Callable) -> Callable:
        for option in reversed(self.options):
            command = option(command)
        return command


class Parsed(click.ParamType):
    """A flag value parsed by `parse(text, flag)`, which raises GdwsError when it is bad,
    so a bad value is one line on stderr like every other user error."""

    def __init__(self, parse: Callable[[str, str], Any], name: str) -> None:
        self.parse = parse
        self.name = name

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        return self.parse(value, param.opts[0] if param is not None else self.name)


def number(cast: type, minimum: Optional[float] = None, name: Optional[str] = None) -> Parsed:
    """A numeric flag type: `cast` of the text, at least `minimum` when one is given;
    `name` is its metavar in --help where the flag gives none."""

    def parse(text: str, flag: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise GdwsError(f"{flag} must be a number ({cast.__name__}), got {text!r}") from None
        if minimum is not None and value < minimum:
            raise GdwsError(f"{flag} must be at least {minimum:g}, got {text}")
        return value

    return Parsed(parse, name or cast.__name__)


def _numbers(text: str, flag: str) -> List[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GdwsError(f"{flag} must be comma-separated numbers, got {text!r}") from None


# A flag of comma-separated numbers ('1.5,2,3') -> [1.5, 2.0, 3.0].
NUMBERS = Parsed(_numbers, "numbers")


# The TensorRT verbs' numeric flags (their names are the metavars --help shows).
COUNT = number(int, 1, "count")
INDEX = number(int, 0, "index")
SECONDS = number(float, 0, "number")
