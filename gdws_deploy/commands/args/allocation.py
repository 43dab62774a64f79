"""--allocation: how a MAC target shares kernels across layers (convert and sweep)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags
from gdws_deploy.passes.gdws.allocation import ALLOCATIONS

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

ALLOCATION_HELP = "How a MAC target shares kernels across layers: " + "; ".join(
    f"{name}: {text}" for name, text in ALLOCATIONS.items()
)


class AllocationArgs(ArgGroup):
    options = (
        click.option(
            "--allocation",
            type=click.Choice(list(ALLOCATIONS)),
            default="auto",
            show_default=True,
            help=ALLOCATION_HELP,
        ),
    )

    @staticmethod
    def apply(options: ConvertOptions, flags: Flags) -> ConvertOptions:
        from gdws_deploy.options import ConvertOptions

        return ConvertOptions.of(options, allocation=flags["allocation"])
