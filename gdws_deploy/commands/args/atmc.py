"""--rank-share, --sparsity, --bits: what --method atmc takes beside --mac-reduction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags, number
from gdws_deploy.errors import GdwsError

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

# Click parameter name -> flag, in --help order.
ATMC_FLAGS = {"rank_share": "--rank-share", "sparsity": "--sparsity", "bits": "--bits"}


class AtmcArgs(ArgGroup):
    """The ATMC flags; each is refused with another --method."""

    options = (
        click.option(
            "--rank-share",
            type=number(float),
            metavar="R",
            help="--method atmc, instead of --mac-reduction: every layer keeps rank "
            "ceil(R x its full rank); a layer that rank makes no cheaper stays dense.",
        ),
        click.option(
            "--sparsity",
            type=number(float),
            metavar="S",
            help="--method atmc: add a sparse residual branch holding the largest errors of "
            "the factors, S of the factored layers' weight entries across the model. It saves "
            "model size, not time: onnxruntime and TensorRT 8.5 (Xavier) run it as a dense conv.",
        ),
        click.option(
            "--bits",
            type=number(int),
            metavar="B",
            help="--method atmc: k-means weight sharing, at most 2^B values per factor and "
            "layer. The weights stay float32 in the graph; the model size counts B bits each.",
        ),
    )

    @staticmethod
    def apply(options: ConvertOptions, flags: Flags) -> ConvertOptions:
        """`options` with the ATMC settings; --rank-share replaces the default MAC target
        (an explicit --mac-reduction with it is two targets)."""
        from gdws_deploy.options import ConvertOptions

        given = {name: flags.get(name) for name in ATMC_FLAGS if flags.get(name) is not None}
        if not given:
            return options
        if options.method != "atmc":
            first = ATMC_FLAGS[next(iter(given))]
            raise GdwsError(f"{first} is ATMC's: give --method atmc too")
        if "rank_share" in given and flags.get("mac_reduction") is None:
            given["mac_reduction"] = None
        return ConvertOptions.of(options, **given)
