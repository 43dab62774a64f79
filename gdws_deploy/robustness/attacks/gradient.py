"""White-box attacks: PGD (Madry et al. 2018) with random start; APGD with the
cross-entropy, DLR or targeted DLR loss and AutoAttack's step-size schedule (Croce & Hein
2020). Each keeps, per sample, the iterate with the lowest margin it has seen."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks.geometry import (
    per_sample,
    project,
    random_start,
    steepest_direction,
)
from gdws_deploy.robustness.attacks.losses import BestSoFar, Model, evaluate_loss
from gdws_deploy.robustness.attacks.seeding import stream

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
    loss: str = "ce",
    random_init: bool = True,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent on the loss: (lowest-margin iterates, their margins).

    sample_ids (default 0..N-1), seed and restart pick each sample's random start.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    rng = stream(f"pgd-{norm}-{loss}", x, sample_ids, seed, restart)
    delta = random_start(x, norm, eps, rng) if random_init else torch.zeros_like(x)
    best = BestSoFar(x)
    for step in range(steps + 1):
        _, margins, grad = evaluate_loss(model, x + delta, y, loss, with_grad=step < steps)
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
    """Auto-PGD (Croce & Hein 2020, Algorithm 1): momentum 0.75, step 2*eps halved at the
    checkpoints where fewer than 75% of the steps since the last one raised the loss, or
    where neither the step nor the best loss changed; a halving restarts from the best point.
    """
    if norm not in ("linf", "l2"):
        raise GdwsError(f"APGD supports l_inf and l_2 budgets, not {norm}")
    if loss == "dlr" and x.shape[0] and _num_classes(model, x[:1]) < 3:
        raise GdwsError("the DLR loss needs at least 3 classes")
    checkpoints = apgd_checkpoints(steps)
    step = torch.full((len(x),), 2.0 * eps, device=x.device)
    rng = stream(f"apgd-{norm}-{loss}", x, sample_ids, seed, restart)
    x_cur = x + random_start(x, norm, eps, rng)
    f_cur, margins, grad = evaluate_loss(model, x_cur, y, loss)
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
        f_new, margins, grad = evaluate_loss(model, x_cur, y, loss, with_grad=k < steps - 1)
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
            restart = per_sample(halve, x)
            x_cur = torch.where(restart, x_max, x_cur)
            x_prev = torch.where(restart, x_max, x_prev)
            grad = torch.where(restart, grad_max, grad)
            f_cur = torch.where(halve, f_max, f_cur)
            increases.zero_()
            step_at_checkpoint, f_max_at_checkpoint = step.clone(), f_max.clone()
            previous_checkpoint = k + 1
    return best.x, best.margin


def _num_classes(model: Model, sample: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(sample).shape[1])
