"""The `gdws-deploy` command line: thin verbs over the Python API.

Verbs are imported only when invoked, so `--help` is instant and the Jetson image, which
has no torch or onnx-graphsurgeon, can still run the runtime verbs. A GdwsError becomes
one line on stderr and exit code 2; nothing else is caught here.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

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


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: run a verb, turning user errors into one line."""
    try:
        cli.main(args=argv, prog_name="gdws-deploy", standalone_mode=False)
    except GdwsError as error:
        click.echo(f"gdws-deploy: error: {error}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("gdws-deploy: aborted", err=True)
        return 130
    except click.UsageError as error:
        verb = error.ctx.command_path if error.ctx else "gdws-deploy"
        click.echo(f"gdws-deploy: error: {error.format_message()} (see '{verb} --help')", err=True)
        return error.exit_code
    except click.ClickException as error:
        click.echo(f"gdws-deploy: error: {error.format_message()}", err=True)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
