"""FAB-T under l_inf (Croce & Hein 2020, "Minimally distorted adversarial examples with a
fast adaptive boundary attack"): towards each target class, step onto the linearized
decision boundary z_t = z_y, mixing the projection of the current iterate with that of the
original (bias towards it, alpha <= alpha_max), overshoot by eta, and after each success
step back towards the original by beta. It looks for the smallest perturbation; a sample
counts as broken when that is within eps."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gdws_deploy.robustness.attacks.geometry import flat, norm_of, per_sample
from gdws_deploy.robustness.attacks.losses import Model, margin, over_targets
from gdws_deploy.robustness.attacks.seeding import SampleRandom, stream

FAB_ALPHA_MAX = 0.1
FAB_ETA = 1.05
FAB_BETA = 0.9


def linf_step_to_plane(t: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per sample, the smallest-l_inf step d with <w, d> = c and t + d in [0, 1] (flat
    (N, D) inputs, c (N,)); where the box makes the plane unreachable, the step that gets
    closest. With lambda the norm, d_i = sign(c w_i) min(lambda, room_i), room_i the box's
    room in that direction; sum |w_i| min(lambda, room_i) = |c| is piecewise linear in
    lambda and solved exactly over the sorted rooms."""
    direction = torch.sign(w) * torch.sign(c)[:, None]
    room = torch.where(direction > 0, 1 - t, t).masked_fill(direction == 0, 0)
    rooms, order = room.sort(dim=1)
    weights = w.abs().gather(1, order)
    zero = torch.zeros_like(c)[:, None]
    weight_before = torch.cat([zero, weights.cumsum(1)], dim=1)  # (N, D + 1), exclusive
    reach_before = torch.cat([zero, (weights * rooms).cumsum(1)], dim=1)
    total = weight_before[:, -1:]
    # how far lambda = rooms[k] reaches: the rooms below it filled, the rest at lambda
    reach_at = reach_before[:, :-1] + rooms * (total - weight_before[:, :-1])
    need = c.abs()[:, None]
    k = (reach_at < need).sum(dim=1, keepdim=True)
    remaining = (total - weight_before.gather(1, k)).clamp_min(1e-30)
    lam = (need - reach_before.gather(1, k)) / remaining
    lam = torch.where(k == rooms.shape[1], rooms[:, -1:], lam)  # unreachable: all the room
    return direction * torch.minimum(lam, room)


def fab_targeted(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    steps: int = 100,
    targets: int = 9,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FAB-T, l_inf: (per sample the smallest adversarial input found if within eps, else
    the clean one; margins). Restart 0 starts at x, later ones at a random point eps/2 away."""

    def run(index, target, ids, rank):
        rng = stream("fab-t-linf", x[index], ids, seed, restart).fork(rank)
        return _fab(model, x[index], y[index], target, eps, steps, rng if restart else None)

    return over_targets(model, x, y, targets, sample_ids, run, min_classes=2)


def _fab(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    steps: int,
    rng: Optional[SampleRandom],
) -> Tuple[torch.Tensor, torch.Tensor]:
    x1 = x.clone()
    if rng is not None:
        noise = rng.uniform(*x.shape[1:]) * 2 - 1
        radius = eps / 2 / norm_of(noise, "linf").clamp_min(1e-12)
        x1 = (x + noise * per_sample(radius, x)).clamp(0, 1)
    origin = flat(x)
    best_norm = torch.full((len(x),), float("inf"), device=x.device)
    best_x = x.clone()
    for _ in range(steps):
        x1 = x1.detach().requires_grad_(True)
        logits = model(x1)
        # f = z_t - z_y >= 0 past the boundary; the plane f + <g, z - x1> = 0 linearizes it
        gap = (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None]))[:, 0]
        (grad,) = torch.autograd.grad(gap.sum(), x1)
        with torch.no_grad():
            g, current = flat(grad), flat(x1)
            d1 = linf_step_to_plane(current, g, -gap)
            d2 = linf_step_to_plane(origin, g, -gap - (g * (origin - current)).sum(1))
            n1 = d1.abs().amax(1).clamp_min(1e-8)
            n2 = d2.abs().amax(1).clamp_min(1e-8)
            alpha = (n1 / (n1 + n2)).clamp(0, FAB_ALPHA_MAX)[:, None]
            moved = (current + FAB_ETA * d1) * (1 - alpha) + (origin + FAB_ETA * d2) * alpha
            x1 = moved.clamp(0, 1).reshape(x.shape)
            fooled = margin(model(x1), y) < 0
            distance = norm_of(x1 - x, "linf")
            better = fooled & (distance < best_norm)
            best_norm = torch.where(better, distance, best_norm)
            best_x = torch.where(per_sample(better, x), x1, best_x)
            x1 = torch.where(per_sample(fooled, x), x + FAB_BETA * (x1 - x), x1)
    within = per_sample(best_norm <= eps, x)
    found = torch.where(within, best_x, x)
    with torch.no_grad():
        return found, margin(model(found), y)
