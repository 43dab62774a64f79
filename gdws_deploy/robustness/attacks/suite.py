"""Running attacks: one restart of a configured attack, and the worst case over attacks
and restarts, spending effort only on samples not yet broken."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from gdws_deploy.robustness.attacks.fab import fab_targeted
from gdws_deploy.robustness.attacks.geometry import per_sample
from gdws_deploy.robustness.attacks.gradient import apgd, apgd_targeted, pgd
from gdws_deploy.robustness.attacks.losses import Model, margin
from gdws_deploy.robustness.attacks.settings import Attack
from gdws_deploy.robustness.attacks.square import square


def run_attack(
    model: Model,
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One restart of `attack`: (lowest-margin inputs, margins)."""
    common = {"sample_ids": sample_ids, "seed": seed, "restart": restart}
    if attack.method == "pgd":
        return pgd(
            model,
            x,
            y,
            attack.norm,
            attack.eps,
            attack.steps,
            attack.step_size,
            attack.loss,
            **common,
        )
    if attack.method == "apgd-t":
        return apgd_targeted(
            model, x, y, attack.norm, attack.eps, attack.steps, attack.targets, **common
        )
    if attack.method == "fab-t":
        return fab_targeted(model, x, y, attack.eps, attack.steps, attack.targets, **common)
    if attack.method == "square":
        return square(model, x, y, attack.eps, attack.queries, **common)
    return apgd(model, x, y, attack.norm, attack.eps, attack.steps, attack.loss, **common)


@dataclass
class WorstCase:
    """Per sample: the most adversarial input found and its margin on the attacked model;
    `x_after`/`margin_after`: the same after each attack in turn (the cumulative worst
    case AutoAttack reports per attack; the last is x_adv/margin)."""

    x_adv: torch.Tensor
    margin: torch.Tensor
    x_after: List[torch.Tensor] = field(default_factory=list)
    margin_after: List[torch.Tensor] = field(default_factory=list)

    @property
    def fooled(self) -> torch.Tensor:
        return self.margin < 0


def worst_case(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[Attack],
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
) -> WorstCase:
    """Every attack and restart in turn; per sample the lowest margin wins, broken samples
    rest: samples already misclassified (clean or by an earlier run) are not attacked again.
    sample_ids are the samples' indices in their data set (default 0..N-1): with `seed`
    they fix every random choice, so a sample's verdict is the same in any batch.
    """
    ids = torch.arange(len(x)) if sample_ids is None else torch.as_tensor(sample_ids)
    with torch.no_grad():
        best = WorstCase(x.clone(), margin(model(x), y))
    for attack in attacks:
        for restart in range(attack.restarts):
            active = (best.margin >= 0).nonzero()[:, 0]
            if len(active) == 0:
                break
            x_adv, margins = run_attack(
                model, attack, x[active], y[active], ids[active.cpu()], seed, restart
            )
            better = margins < best.margin[active]
            best.margin[active] = torch.where(better, margins, best.margin[active])
            best.x_adv[active] = torch.where(per_sample(better, x_adv), x_adv, best.x_adv[active])
        best.x_after.append(best.x_adv.clone())
        best.margin_after.append(best.margin.clone())
    return best
