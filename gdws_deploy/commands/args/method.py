"""--method: the compression pass a conversion runs (convert and sweep)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags
from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.int8 import QUANTIZE_ONLY
from gdws_deploy.passes.registry import PASSES

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

# Flags that steer GDWS only (by click parameter name): another method refuses them.
GDWS_ONLY: Mapping[str, str] = {
    "beta": "--beta",
    "budget": "--budget",
    "betas": "--betas",
    "speedup": "--speedup",
    "speed_ratio": "--speed-ratio",
    "tune": "--tune",
    "lowering": "--lowering",
    "alphas": "--alphas",
    "allocation": "--allocation",
    "max_robust_drop": "--max-robust-drop",
    "dataset": "--dataset",
}


class MethodArgs(ArgGroup):
    """--method; `allowed`: GDWS-only flags the verb still gives every method (sweep
    measures on --dataset, it does not calibrate with it)."""

    def __init__(self, allowed: Sequence[str] = ()) -> None:
        self.allowed = tuple(allowed)
        self.options = (
            click.option(
                "--method",
                type=click.Choice(list(PASSES)),
                default="gdws",
                show_default=True,
                help="gdws: generalized depthwise-separable factors; gkp: grouped kernel "
                "pruning (Zhong et al. 2023; one-shot, data-free; --mac-reduction only); atmc: "
                "low-rank filter banks, optional sparse residual and k-means weight sharing "
                "(Gui et al. 2019, post-training part; --mac-reduction or --rank-share); int8: "
                "static INT8 quantization alone (no target; --calib).",
            ),
        )

    def apply(self, options: ConvertOptions, flags: Flags) -> ConvertOptions:
        """`options` with the method; GdwsError naming the first GDWS-only flag another
        method was given (a value other than None and the default 'auto')."""
        from gdws_deploy.options import ConvertOptions

        method = flags["method"]
        if method != "gdws":
            takes = "--mac-reduction " + ("or --rank-share" if method == "atmc" else "only")
            refused = dict(GDWS_ONLY)
            if method == QUANTIZE_ONLY:  # quantization alone takes no target at all
                takes, refused["mac_reduction"] = "no target", "--mac-reduction"
            for name, flag in refused.items():
                if name not in self.allowed and flags.get(name) not in (None, "auto"):
                    raise GdwsError(f"--method {method} takes {takes}, not {flag}")
        return ConvertOptions.of(options, method=method)
