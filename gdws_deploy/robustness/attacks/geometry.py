"""Per-sample norms, steepest-ascent directions and exact projections onto the norm ball
intersected with the [0, 1] box: l_inf by clipping; l_2 and l_1 by a per-sample bisection
on the KKT multiplier (40 halvings, the feasible end kept, so results never leave the ball).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from gdws_deploy.robustness.attacks.seeding import SampleRandom

L1_STEP_FRACTION = 0.01  # coordinates moved per l_1 step (SLIDE's 99th percentile)
_BISECTIONS = 40


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) broadcasting against `like`."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """(N, ...) -> (N,) per-sample norm."""
    order = {"linf": math.inf, "l2": 2, "l1": 1}[norm]
    return torch.linalg.vector_norm(flat(delta), ord=order, dim=1)


def _bisect(
    norm_at: Callable[[torch.Tensor], torch.Tensor],
    feasible: torch.Tensor,
    infeasible: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Per-sample parameter between `feasible` and `infeasible` where norm_at crosses eps.

    norm_at is monotone in the parameter; the end kept is always the feasible one.
    """
    for _ in range(_BISECTIONS):
        middle = (feasible + infeasible) / 2
        ok = norm_at(middle) <= eps
        feasible = torch.where(ok, middle, feasible)
        infeasible = torch.where(ok, infeasible, middle)
    return feasible


def project(delta: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The closest perturbation to `delta` with ||d|| <= eps and x + d in [0, 1]."""
    low, high = -x, 1 - x
    if norm == "linf":
        return torch.minimum(torch.maximum(delta.clamp(-eps, eps), low), high)
    if norm == "l2":  # d = clip(t * delta, box), t in [0, 1] (t = 1 / (1 + multiplier))
        boxed = torch.minimum(torch.maximum(delta, low), high)
        inside = norm_of(boxed, "l2") <= eps

        def scaled(t: torch.Tensor) -> torch.Tensor:
            return torch.minimum(torch.maximum(delta * per_sample(t, delta), low), high)

        start = torch.zeros(len(delta), dtype=delta.dtype, device=delta.device)
        t = _bisect(lambda t: norm_of(scaled(t), "l2"), start, torch.ones_like(start), eps)
        return torch.where(per_sample(inside, delta), boxed, scaled(t))
    # l1: d = clip(soft_threshold(delta, lam), box), lam >= 0 found by bisection
    magnitude, sign = delta.abs(), delta.sign()

    def shrunk(lam: torch.Tensor) -> torch.Tensor:
        soft = sign * (magnitude - per_sample(lam, delta)).clamp_min(0)
        return torch.minimum(torch.maximum(soft, low), high)

    zero = torch.zeros(len(delta), dtype=delta.dtype, device=delta.device)
    inside = norm_of(shrunk(zero), "l1") <= eps
    top = flat(magnitude).amax(dim=1)
    lam = _bisect(lambda lam: norm_of(shrunk(lam), "l1"), top, zero, eps)
    return shrunk(torch.where(inside, zero, lam))


def steepest_direction(grad: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-norm direction of steepest ascent of a linear function with gradient `grad`.

    l_1: the sparse steepest step (SLIDE, Tramer & Boneh 2019): the sign of the largest
    1% of gradient entries, skipping pixels the [0, 1] box blocks, scaled to l_1 norm 1.
    """
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / per_sample(norm_of(grad, "l2").clamp_min(1e-12), grad)
    blocked = ((x_adv >= 1) & (grad > 0)) | ((x_adv <= 0) & (grad < 0))
    strength = flat(grad.abs().masked_fill(blocked, 0))
    count = max(1, round(L1_STEP_FRACTION * strength.shape[1]))
    chosen = torch.zeros_like(strength).scatter_(1, strength.topk(count, dim=1).indices, 1.0)
    return grad.sign() * chosen.reshape(grad.shape) / count


def random_start(x: torch.Tensor, norm: str, eps: float, rng: SampleRandom) -> torch.Tensor:
    """A random perturbation inside the feasible set, drawn from each sample's own stream."""
    shape = x.shape[1:]
    if norm == "linf":
        noise = (rng.uniform(*shape) * 2 - 1) * eps
    else:
        if norm == "l2":
            noise = rng.normal(*shape)
        else:
            noise = torch.distributions.Laplace(0.0, 1.0).icdf(
                rng.uniform(*shape).clamp(1e-6, 1 - 1e-6)
            )
        radius = rng.fork("radius").uniform() * eps  # (N,)
        noise = noise * per_sample(radius / norm_of(noise, norm).clamp_min(1e-12), noise)
    return project(noise.to(x.device, x.dtype), x, norm, eps)
