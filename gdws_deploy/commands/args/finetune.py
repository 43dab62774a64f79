"""--steps, --lr, --momentum, --weight-decay, --clean-share: how finetune trains; with the
perturbation and data flags they build one FinetuneOptions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags, number

if TYPE_CHECKING:
    from gdws_deploy.commands.args.data import Sampling
    from gdws_deploy.robustness.attacks import Attack
    from gdws_deploy.robustness.finetune import FinetuneOptions

RATE = number(float, 0, "rate")


class FinetuneArgs(ArgGroup):
    """The optimizer's flags; the batch, seed, normalization and device come from the data
    and device groups, the PGD from the perturbation group."""

    options = (
        click.option(
            "--steps",
            type=click.IntRange(min=0),
            default=200,
            show_default=True,
            help="SGD steps, one batch each (0 writes MODEL's weights back unchanged).",
        ),
        click.option(
            "--lr",
            type=RATE,
            default="0.001",
            show_default=True,
            help="Initial learning rate, annealed to 0 over the steps (cosine).",
        ),
        click.option("--momentum", type=RATE, default="0.9", show_default=True),
        click.option("--weight-decay", type=RATE, default="0", show_default=True),
        click.option(
            "--clean-share",
            type=RATE,
            default="0",
            show_default=True,
            help="Weight of the clean loss beside the adversarial one (0: adversarial only).",
        ),
    )

    @staticmethod
    def build(flags: Flags, attack: Optional[Attack], sampling: Sampling) -> FinetuneOptions:
        from gdws_deploy.robustness.finetune import FinetuneOptions

        return FinetuneOptions(
            steps=flags["steps"],
            batch_size=sampling["batch_size"],
            lr=flags["lr"],
            momentum=flags["momentum"],
            weight_decay=flags["weight_decay"],
            attack=attack,
            clean_share=flags["clean_share"],
            seed=sampling["seed"],
            mean=sampling["mean"],
            std=sampling["std"],
            device=sampling["device"],
        )
