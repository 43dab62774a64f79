"""Running attacks: one restart of a configured attack, and the worst case over attacks
and restarts, spending effort only on samples not yet broken."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from gdws_deploy.robustness.attacks.geometry import per_sample
from gdws_deploy.robustness.attacks.gradient import apgd, pgd
from gdws_deploy.robustness.attacks.losses import Model, margin
from gdws_deploy.robustness.attacks.settings import Attack


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
            True,
            sample_ids,
            seed,
            restart,
        )
    return apgd(
        model, x, y, attack.norm, attack.eps, attack.steps, attack.loss, sample_ids, seed, restart
    )


@dataclass
class WorstCase:
    """Per sample: the most adversarial input found and its margin on the attacked model."""

    x_adv: torch.Tensor
    margin: torch.Tensor

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
    """Every attack and restart; per sample the lowest margin wins, broken samples rest.

    Samples already misclassified (clean or by an earlier run) are not attacked again.
    sample_ids are the samples' indices in their data set (default 0..N-1): with `seed`
    they fix every random choice, so a sample's verdict is the same in any batch.
    """
    ids = torch.arange(len(x)) if sample_ids is None else torch.as_tensor(sample_ids)
    with torch.no_grad():
        best_margin = margin(model(x), y)
    best_x = x.clone()
    for attack in attacks:
        for restart in range(attack.restarts):
            active = (best_margin >= 0).nonzero()[:, 0]
            if len(active) == 0:
                return WorstCase(best_x, best_margin)
            x_adv, margins = run_attack(
                model, attack, x[active], y[active], ids[active.cpu()], seed, restart
            )
            better = margins < best_margin[active]
            best_margin[active] = torch.where(better, margins, best_margin[active])
            best_x[active] = torch.where(per_sample(better, x_adv), x_adv, best_x[active])
    return WorstCase(best_x, best_margin)
