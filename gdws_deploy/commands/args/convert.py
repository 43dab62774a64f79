"""The conversion flags together -> ConvertOptions, the one value convert() takes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gdws_deploy.commands.args.allocation import AllocationArgs
from gdws_deploy.commands.args.atmc import AtmcArgs
from gdws_deploy.commands.args.base import Flags
from gdws_deploy.commands.args.method import MethodArgs
from gdws_deploy.commands.args.selection import SelectionArgs
from gdws_deploy.commands.args.target import SpeedGoalArgs, TargetArgs
from gdws_deploy.commands.args.tune import TuneArgs
from gdws_deploy.passes.int8 import QUANTIZE_ONLY

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions


class ConvertArgs:
    """Builds from its groups' flags, which the verb applies itself (in its --help order),
    plus the verb's own --alphas and --no-parity."""

    def __init__(self) -> None:
        self.method = MethodArgs()
        self.target = TargetArgs()
        self.atmc = AtmcArgs()
        self.speed_goal = SpeedGoalArgs()
        self.selection = SelectionArgs()
        self.tune = TuneArgs()
        self.allocation = AllocationArgs()

    def build(self, flags: Flags, searched: bool = False) -> ConvertOptions:
        """The options; `searched`: a search chooses the MAC target, so none is defaulted."""
        from gdws_deploy.options import ConvertOptions

        options = ConvertOptions(alphas=flags["alphas"], check_parity=not flags["no_parity"])
        options = self.method.apply(options, flags)
        options = self.speed_goal.apply(options, flags)
        default = not searched and options.method != QUANTIZE_ONLY  # INT8 alone: no target
        options = self.target.apply(options, flags, default=default)
        options = self.atmc.apply(options, flags)
        options = self.selection.apply(options, flags)
        options = self.tune.apply(options, flags)
        return self.allocation.apply(options, flags)
