"""White-box attacks: PGD (Madry et al. 2018) with random start; APGD with the
cross-entropy, DLR or targeted DLR loss and AutoAttack's step-size schedule (Croce & Hein
2020). Each keeps, per sample, the iterate with the lowest margin it has seen."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks.geometry import (
    per_sample,
    project,
    random_start,
    steepest_direction,
)
from gdws_deploy.robustness.attacks.losses import (
    LOSSES,
    BestSoFar,
    MarginOf,
    Model,
    Objective,
    evaluate_loss,
    margin,
    num_classes,
    over_targets,
    targeted_dlr_loss,
)
from gdws_deploy.robustness.attacks.seeding import SampleRandom, stream

APGD_MOMENTUM = 0.75
APGD_RHO = 0.75


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 10,
    step_size: Optional[float] = None,
    loss: Union[str, Objective] = "ce",
    random_init: bool = True,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
    margin_of: MarginOf = margin,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent on the loss: (lowest-margin iterates, their margins).

    loss: a name in LOSSES, or an objective on the model's output (its __name__ keys the
    random stream); margin_of: what "lowest margin" means when the output is not one
    logits tensor (a multi-exit model). sample_ids (default 0..N-1), seed and restart
    pick each sample's random start.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    objective, label = (LOSSES[loss], loss) if isinstance(loss, str) else (loss, loss.__name__)
    rng = stream(f"pgd-{norm}-{label}", x, sample_ids, seed, restart)
    delta = random_start(x, norm, eps, rng) if random_init else torch.zeros_like(x)
    best = BestSoFar(x)
    for step in range(steps + 1):
        _, margins, grad = evaluate_loss(
            model, x + delta, y, objective, with_grad=step < steps, margin_of=margin_of
        )
        best.offer(x + delta, margins)
        if grad is not None:
            delta = project(
                delta + step_size * steepest_direction(grad, x + delta, norm), x, norm, eps
            )
    return best.x, best.margin


def apgd_checkpoints(steps: int) -> List[int]:
    """Iterations where APGD may halve its step: w_j = ceil(p_j * steps), Croce & Hein 2020.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    """
    fractions = [0.0, 0.22]
    while fractions[-1] < 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    # round() first: 0.41 * 100 is 41.000000000000004 in floating point
    return sorted({math.ceil(round(p * steps, 9)) for p in fractions if p <= 1})


def apgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    loss: str = "ce",
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1) on the cross-entropy or DLR loss."""
    _check_apgd(model, x, norm, 3 if loss == "dlr" else 0)
    rng = stream(f"apgd-{norm}-{loss}", x, sample_ids, seed, restart)
    return _apgd(model, x, y, norm, eps, steps, LOSSES[loss], rng)


def apgd_targeted(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    targets: int = 9,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss towards each of the
    `targets` classes ranked highest after the first, on the samples not yet broken."""
    _check_apgd(model, x, norm, 4)

    def run(index, target, ids, rank):
        rng = stream(f"apgd-t-{norm}", x[index], ids, seed, restart).fork(rank)

        def objective(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return targeted_dlr_loss(logits, labels, target)

        return _apgd(model, x[index], y[index], norm, eps, steps, objective, rng)

    return over_targets(model, x, y, targets, sample_ids, run, min_classes=4)


def _check_apgd(model: Model, x: torch.Tensor, norm: str, min_classes: int) -> None:
    if norm not in ("linf", "l2"):
        raise GdwsError(f"APGD supports l_inf and l_2 budgets, not {norm}")
    if min_classes and x.shape[0] and num_classes(model, x[:1]) < min_classes:
        raise GdwsError(f"the loss needs at least {min_classes} classes")


def _apgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    steps: int,
    objective: Objective,
    rng: SampleRandom,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """APGD's iteration: momentum 0.75, step 2*eps halved at the checkpoints where fewer
    than 75% of the steps since the last one raised the objective, or where neither the
    step nor the best objective changed; a halving restarts from the best point."""
    checkpoints = apgd_checkpoints(steps)
    step = torch.full((len(x),), 2.0 * eps, device=x.device)
    x_cur = x + random_start(x, norm, eps, rng)
    f_cur, margins, grad = evaluate_loss(model, x_cur, y, objective)
    best = BestSoFar(x)
    best.offer(x_cur, margins)
    f_max, x_max, grad_max = f_cur.clone(), x_cur.clone(), grad.clone()
    x_prev = x_cur.clone()
    increases = torch.zeros(len(x), device=x.device)
    step_at_checkpoint, f_max_at_checkpoint = step.clone(), f_max.clone()
    previous_checkpoint = 0
    for k in range(steps):
        scale = per_sample(step, x)
        z = x + project(x_cur + scale * steepest_direction(grad, x_cur, norm) - x, x, norm, eps)
        weight = 1.0 if k == 0 else APGD_MOMENTUM
        moved = x_cur + weight * (z - x_cur) + (1 - weight) * (x_cur - x_prev)
        x_prev, x_cur = x_cur, x + project(moved - x, x, norm, eps)
        f_new, margins, grad = evaluate_loss(model, x_cur, y, objective, with_grad=k < steps - 1)
        best.offer(x_cur, margins)
        increases += (f_new > f_cur).float()
        f_cur = f_new
        improved = f_new > f_max
        f_max = torch.where(improved, f_new, f_max)
        x_max = torch.where(per_sample(improved, x), x_cur, x_max)
        if grad is None:
            break
        grad_max = torch.where(per_sample(improved, x), grad, grad_max)
        if k + 1 in checkpoints and k + 1 > previous_checkpoint:
            window = k + 1 - previous_checkpoint
            too_few = increases < APGD_RHO * window
            stalled = (step_at_checkpoint == step) & (f_max_at_checkpoint == f_max)
            halve = too_few | stalled
            step = torch.where(halve, step / 2, step)
            back = per_sample(halve, x)
            x_cur = torch.where(back, x_max, x_cur)
            x_prev = torch.where(back, x_max, x_prev)
            grad = torch.where(back, grad_max, grad)
            f_cur = torch.where(halve, f_max, f_cur)
            increases.zero_()
            step_at_checkpoint, f_max_at_checkpoint = step.clone(), f_max.clone()
            previous_checkpoint = k + 1
    return best.x, best.margin
