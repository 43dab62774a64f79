"""The data and attack flags together (with --device, --providers, --workers and
--ray-address where the verb declares them) -> RobustnessCheck, the measurement a search
or a sweep repeats on every converted model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from gdws_deploy.commands.args.attack import AttackArgs
from gdws_deploy.commands.args.base import Flags
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.commands.args.device import DeviceArgs
from gdws_deploy.commands.args.workers import WorkersArgs

if TYPE_CHECKING:
    from gdws_deploy.robustness.attacks import Attack
    from gdws_deploy.robustness.check import RobustnessCheck


class CheckArgs:
    """Builds from the flags of a DataArgs and an AttackArgs, which the verb applies itself
    (their flags need not sit together in --help)."""

    def __init__(self, data: DataArgs, attacks: AttackArgs) -> None:
        self.data = data
        self.attacks = attacks

    def build(
        self,
        flags: Flags,
        backend: str = "ort",
        spec: Optional[str] = None,
        attacks: Optional[Sequence[Attack]] = None,
    ) -> RobustnessCheck:
        """The check on --dataset (or `spec`) with the attack flags' attacks (or `attacks`)."""
        from gdws_deploy.robustness.check import RobustnessCheck

        attacks = self.attacks.build(flags) if attacks is None else attacks
        providers = DeviceArgs.providers(flags)
        return RobustnessCheck(
            self.data.build(flags, spec),
            tuple(attacks),
            backend=backend,
            providers=tuple(providers) if providers else None,
            sharding=WorkersArgs.build(flags) if "workers" in flags else None,
            **self.data.sampling(flags),
        )
