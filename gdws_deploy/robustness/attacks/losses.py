"""Margins and losses, and the per-sample best iterate every attack keeps."""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)

from gdws_deploy.robustness.attacks.geometry import per_sample

Model = Callable[[torch.Tensor], torch.Tensor]


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per sample: negative means misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -math.inf)
    return true - others.amax(dim=1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)."""
    top = logits.topk(3, dim=1).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def _loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return dlr_loss(logits, y)


def evaluate_loss(
    model: Model, x_adv: torch.Tensor, y: torch.Tensor, loss: str, with_grad: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(per-sample loss, margin, input gradient of the summed loss)."""
    if not with_grad:
        with torch.no_grad():
            logits = model(x_adv)
        return _loss(logits, y, loss), margin(logits, y), None
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    values = _loss(logits, y, loss)
    (grad,) = torch.autograd.grad(values.sum(), x_adv)
    return values.detach(), margin(logits.detach(), y), grad


class BestSoFar:
    """Per-sample lowest-margin iterate seen so far."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        self.margin = torch.full((len(x),), math.inf, device=x.device)

    def offer(self, x_adv: torch.Tensor, margins: torch.Tensor) -> None:
        better = margins < self.margin
        self.margin = torch.where(better, margins, self.margin)
        self.x = torch.where(per_sample(better, x_adv), x_adv.detach(), self.x)
