"""The `gdws-deploy` command line: thin verbs over the Python API.

Verbs are imported only when invoked, so `--help` is instant and the Jetson image, which
has no torch or onnx-graphsurgeon, can still run the runtime verbs. A GdwsError becomes
one line on stderr and exit code 2; SIGTERM and SIGHUP unwind like Ctrl-C, so a temporary
output file is removed (gdws_deploy/atomic.py), and exit 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from types import FrameType
from typing import Iterator, List, Optional

import click

from gdws_deploy import __version__
from gdws_deploy.errors import GdwsError

# verb -> "module:click command", each module under gdws_deploy/commands/
VERBS = {
    "build": "gdws_deploy.commands.build:build_command",
    "bench": "gdws_deploy.commands.bench:bench_command",
    "trtexec": "gdws_deploy.commands.trtexec:trtexec_command",
    "convert": "gdws_deploy.commands.convert:convert_command",
    "alphas": "gdws_deploy.commands.alphas:alphas_command",
    "eval": "gdws_deploy.commands.eval:eval_command",
    "sweep": "gdws_deploy.commands.sweep:sweep_command",
    "compare": "gdws_deploy.commands.compare:compare_command",
    "finetune": "gdws_deploy.commands.finetune:finetune_command",
    "exits": "gdws_deploy.commands.exits:exits_command",
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in VERBS:
            return None
        module, attribute = VERBS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gdws-deploy")
def cli() -> None:
    """Make robust CNNs fast with generalized depthwise-separable convolutions."""


# Signals that end a run the way Ctrl-C does (Ctrl-C itself is click's Abort, exit 130).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """Raised in the main thread by a stop signal; unwinds `finally` blocks like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.name = signal.Signals(signum).name


def _raise_terminated(signum: int, frame: Optional[FrameType]) -> None:
    for number in STOP_SIGNALS:  # a second signal during the clean-up ends the process
        if signal.getsignal(number) is _raise_terminated:
            signal.signal(number, signal.SIG_DFL)
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """While inside, SIGTERM/SIGHUP raise Terminated; the previous handlers come back after.

    By default they end the process at once, skipping the clean-up that removes a
    half-written temporary output. A signal already ignored (`nohup` ignores SIGHUP) stays
    ignored. Handlers can only be set in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        number: signal.signal(number, _raise_terminated)
        for number in STOP_SIGNALS
        if signal.getsignal(number) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for number, handler in previous.items():  # None: a handler set outside Python
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: run a verb, turning user errors into one line."""
    try:
        with stop_signals_unwind():
            cli.main(args=argv, prog_name="gdws-deploy", standalone_mode=False)
    except Terminated as stop:
        click.echo(f"gdws-deploy: terminated ({stop.name})", err=True)
        return int(stop.code)
    except GdwsError as error:
        click.echo(f"gdws-deploy: error: {error}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("gdws-deploy: aborted", err=True)
        return 130
    except click.UsageError as error:
        verb = _command_path(error, sys.argv[1:] if argv is None else argv)
        click.echo(f"gdws-deploy: error: {error.format_message()} (see '{verb} --help')", err=True)
        return error.exit_code
    except click.ClickException as error:
        click.echo(f"gdws-deploy: error: {error.format_message()}", err=True)
        return error.exit_code
    return 0


def _command_path(error: click.UsageError, argv: List[str]) -> str:
    """The command whose --help to point at. Click's parser leaves `ctx` unset on some
    errors (an option missing its value); the verb is then the first word of argv."""
    if error.ctx is not None:
        return error.ctx.command_path
    verb = next((word for word in argv if not word.startswith("-")), None)
    return f"gdws-deploy {verb}" if verb in VERBS else "gdws-deploy"


if __name__ == "__main__":
    sys.exit(main())
