"""convert's targets: per layer (--beta, --budget), whole model (--mac-reduction) and the
speed goals (--speedup, --speed-ratio) that a tuned conversion measures."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags, number
from gdws_deploy.errors import GdwsError

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

DEFAULT_MAC_REDUCTION = 2.0
FLOAT, INT = number(float), number(int)


class TargetArgs(ArgGroup):
    """--beta, --budget, --mac-reduction; none given means the default MAC reduction."""

    options = (
        click.option(
            "--beta", type=FLOAT, metavar="B", help="Per layer (LEGO): fewest kernels, error <= B."
        ),
        click.option(
            "--budget", type=INT, metavar="N", help="Per layer (MEGO): at most N kernels."
        ),
        click.option(
            "--mac-reduction",
            type=FLOAT,
            metavar="R",
            help="Whole model: R times fewer MACs, least error "
            f"[default: {DEFAULT_MAC_REDUCTION:g} when no target is given].",
        ),
    )

    @staticmethod
    def given(flags: Flags) -> bool:
        return any(flags[name] is not None for name in ("beta", "budget", "mac_reduction"))

    def apply(self, options: ConvertOptions, flags: Flags, default: bool = True) -> ConvertOptions:
        """`options` with these targets; with `default`, the default MAC reduction when no
        target (speed goals included) is given."""
        from gdws_deploy.options import ConvertOptions

        beta, budget, mac_reduction = flags["beta"], flags["budget"], flags["mac_reduction"]
        if default and not self.given(flags) and not options.has_speed_goal:
            mac_reduction = DEFAULT_MAC_REDUCTION
        return ConvertOptions.of(options, beta=beta, budget=budget, mac_reduction=mac_reduction)


class SpeedGoalArgs(ArgGroup):
    """--speedup, --speed-ratio: how much faster the tuned conversion must measure."""

    options = (
        click.option(
            "--speedup",
            type=FLOAT,
            metavar="S",
            help="With --tune: at least S times faster than MODEL on that backend, least error; "
            "alone or with --mac-reduction. Each layer takes dense or m kernels per channel, "
            "timed inside the whole model.",
        ),
        click.option(
            "--speed-ratio",
            type=FLOAT,
            metavar="E",
            help="With --tune and --mac-reduction: a speed-up at least E times the MAC reduction "
            "reached (0.8: every MAC removed buys 80 % of its share of time), least error.",
        ),
    )

    @staticmethod
    def apply(options: ConvertOptions, flags: Flags) -> ConvertOptions:
        """`options` with the speed goal; a goal needs a backend to measure on (--tune)."""
        from gdws_deploy.options import ConvertOptions

        speedup, speed_ratio = flags["speedup"], flags["speed_ratio"]
        if (speedup, speed_ratio) == (None, None):
            return options
        if flags["tune"] is None:
            raise GdwsError("--speedup and --speed-ratio are measured: give --tune ort|trt too")
        if speed_ratio is not None and flags["mac_reduction"] is None:  # never a silent 2x
            raise GdwsError(
                "--speed-ratio is a share of the MAC reduction: give --mac-reduction too"
            )
        return ConvertOptions.of(options, speedup=speedup, speed_ratio=speed_ratio)
