"""--all-layers, --include, --exclude: which Convs a conversion may rewrite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions


class SelectionArgs(ArgGroup):
    options = (
        click.option("--all-layers", is_flag=True, help="Convert the first conv too."),
        click.option(
            "--include",
            multiple=True,
            metavar="GLOB",
            help="Only Convs named like GLOB (repeatable).",
        ),
        click.option(
            "--exclude",
            multiple=True,
            metavar="GLOB",
            help="Leave Convs named like GLOB (repeatable).",
        ),
    )

    @staticmethod
    def apply(options: ConvertOptions, flags: Flags) -> ConvertOptions:
        from gdws_deploy.options import ConvertOptions

        return ConvertOptions.of(
            options,
            all_layers=flags["all_layers"],
            include=flags["include"],
            exclude=flags["exclude"],
        )
