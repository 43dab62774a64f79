"""`gdws-deploy exits`: deploy multi-exit models (split, calibrate, bench; eval attacks them).

`eval` lives in commands/exits_eval.py and is imported only when invoked, like every verb.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import List, Optional

import click

# subcommand -> "module:click command", imported on first use
LAZY = {"eval": "gdws_deploy.commands.exits_eval:exits_eval_command"}


class ExitsGroup(click.Group):
    """The group's own subcommands plus the lazily imported ones (LAZY)."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted({*super().list_commands(ctx), *self._landed()})

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.commands or name not in self._landed():
            return super().get_command(ctx, name)
        module, attribute = LAZY[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    @staticmethod
    def _landed() -> List[str]:
        """The lazy subcommands whose module is installed."""
        found = importlib.util.find_spec
        return [name for name, target in LAZY.items() if found(target.split(":")[0])]


@click.group("exits", cls=ExitsGroup)
def exits_command() -> None:
    """Multi-exit models (outputs exit_0, exit_1, ..., final): split into stages, calibrate
    exit thresholds to a MAC budget, benchmark the staged runtime."""
