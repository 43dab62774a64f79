"""--steps, --lr, --momentum, --weight-decay, --clean-share: how finetune trains; with the
perturbation and data flags they build one FinetuneOptions. --finetune / --finetune-data:
convert's search fine-tunes its probes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags, number
from gdws_deploy.errors import GdwsError

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


# PGD iterations per fine-tuning batch inside the search: half the verdicts' default of 10,
# as the fine-tunes measured in the README (each probe is fine-tuned, so it adds up).
SEARCH_ATTACK_STEPS = 5


class SearchFinetuneArgs(ArgGroup):
    """--finetune STEPS --finetune-data D on convert: every probe of --max-robust-drop's
    search is fine-tuned before it is judged, so the search can keep the cuts a short
    robust fine-tune wins back (and writes the fine-tuned model)."""

    options = (
        click.option(
            "--finetune",
            type=click.IntRange(min=1),
            metavar="STEPS",
            help="With --max-robust-drop: fine-tune every probe this many steps (PGD-5 at the "
            "verdicts' eps and --step-size, as `gdws-deploy finetune`) on --finetune-data "
            "before judging it on --dataset.",
        ),
        click.option(
            "--finetune-data",
            metavar="SPEC",
            help="Training data --finetune trains on (never the held-out --dataset).",
        ),
    )

    @staticmethod
    def build(flags: Flags, check: Any) -> Optional[Callable[[Any], Any]]:
        """What each probe goes through (None without --finetune); GdwsError for flags
        that do not go together."""
        steps, spec = flags["finetune"], flags["finetune_data"]
        if steps is None:
            if spec is not None:
                raise GdwsError("--finetune-data needs --finetune STEPS")
            return None
        if flags["max_robust_drop"] is None:
            raise GdwsError(
                "--finetune fine-tunes --max-robust-drop's probes; to fine-tune one "
                "conversion, run `gdws-deploy finetune` on its output"
            )
        if spec is None:
            raise GdwsError("--finetune needs --finetune-data TRAIN (training data)")
        if spec == flags["dataset"]:
            raise GdwsError(
                "--finetune-data is --dataset: judging on the data fine-tuned on overstates "
                "robustness; give a training split"
            )
        from gdws_deploy.robustness.attacks import make_attacks, parse_per_norm
        from gdws_deploy.robustness.data import load_dataset
        from gdws_deploy.robustness.finetune import FinetuneOptions, finetune

        judged = check.attacks[0]
        (attack,) = make_attacks(  # --step-size, if given, is PGD's here too (as joint.py's)
            f"pgd-{judged.norm}",
            {judged.norm: judged.eps},
            SEARCH_ATTACK_STEPS,
            parse_per_norm(flags["step_size"], "--step-size"),
        )
        train = load_dataset(spec)
        options = FinetuneOptions(
            steps=steps,
            attack=attack,
            seed=check.seed,
            mean=check.mean,
            std=check.std,
            device=check.device,
        )
        return lambda model: finetune(model, train, options)[0]
