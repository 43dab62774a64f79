"""The attack flags: eval's, convert's and sweep's list of attacks, and alphas' single PGD."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags

if TYPE_CHECKING:
    from gdws_deploy.robustness.attacks import Attack


class AttackArgs(ArgGroup):
    """--attack, --eps, --steps, --step-size, --restarts, --targets, --queries -> the attacks,
    run in turn (each on the samples still robust), the worst case per sample counting."""

    options = (
        click.option(
            "--attack",
            "attack_names",
            default="pgd-linf",
            show_default=True,
            metavar="A[,A...]",
            help="pgd-linf, pgd-l2, pgd-l1, apgd-ce, apgd-dlr, apgd-ce-l2, apgd-dlr-l2, apgd-t, "
            "fab-t, square, or autoattack (= apgd-ce,apgd-t,fab-t,square, 100 steps); run in "
            "turn on the samples still robust, the worst case per sample counts.",
        ),
        click.option(
            "--eps",
            metavar="E | NORM=E,...",
            help="Budget, e.g. 8/255 or linf=8/255,l2=0.5 [default: linf 8/255, l2 0.5, l1 12].",
        ),
        click.option(
            "--steps",
            type=click.IntRange(min=1),
            help="Iterations of PGD, APGD, APGD-T and FAB-T [default: 10; autoattack 100].",
        ),
        click.option(
            "--step-size", metavar="S | NORM=S,...", help="PGD step [default: 2.5*eps/steps]."
        ),
        click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True),
        click.option(
            "--targets",
            type=click.IntRange(min=1),
            help="Target classes of APGD-T and FAB-T: the highest-ranked after the first "
            "[default: 9].",
        ),
        click.option(
            "--queries",
            type=click.IntRange(min=1),
            help="Model queries per sample of Square [default: 5000].",
        ),
    )

    @staticmethod
    def build(flags: Flags) -> List[Attack]:
        from gdws_deploy.robustness.attacks import make_attacks, parse_per_norm

        given = {name: flags[name] for name in ("targets", "queries") if flags[name]}
        return make_attacks(
            flags["attack_names"],
            parse_per_norm(flags["eps"], "--eps"),
            flags["steps"],
            parse_per_norm(flags["step_size"], "--step-size"),
            flags["restarts"],
            **given,
        )


class PerturbationArgs(ArgGroup):
    """--attack pgd|none, --norm, --eps, --steps, --step-size -> one PGD attack, or None
    (clean samples): what alphas are measured under, and what finetune trains on (whose
    --steps count training steps: `steps_flag` names the PGD iterations' flag)."""

    def __init__(self, steps_flag: str = "--steps") -> None:
        self.steps_key = steps_flag.lstrip("-").replace("-", "_")
        self.options = (
            click.option(
                "--attack",
                type=click.Choice(["pgd", "none"]),
                default="pgd",
                show_default=True,
                help="Perturb the samples with PGD first, or use them clean.",
            ),
            click.option(
                "--norm", type=click.Choice(["linf", "l2", "l1"]), default="linf", show_default=True
            ),
            click.option(
                "--eps", default="8/255", show_default=True, help="PGD budget (fractions allowed)."
            ),
            click.option(
                steps_flag,
                self.steps_key,
                type=click.IntRange(min=1),
                default=10,
                show_default=True,
                help="PGD iterations.",
            ),
            click.option(
                "--step-size", help="PGD step [default: 2.5*eps/steps, 2/255 for the defaults]."
            ),
        )

    def build(self, flags: Flags) -> Optional[Attack]:
        from gdws_deploy.robustness.attacks import make_attacks, parse_fraction

        if flags["attack"] == "none":
            return None
        norm, step_size = flags["norm"], flags["step_size"]
        budget = {norm: parse_fraction(flags["eps"], "--eps")}
        step = {norm: parse_fraction(step_size, "--step-size")} if step_size else None
        (attack,) = make_attacks(f"pgd-{norm}", budget, flags[self.steps_key], step)
        return attack
