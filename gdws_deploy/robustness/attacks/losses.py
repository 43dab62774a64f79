"""Margins and losses, and the per-sample best iterate every attack keeps."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks.geometry import per_sample

Model = Callable[[torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (model output, labels) -> per-sample margin (negative: broken); the output may be a tuple
# (a multi-exit model's exits), the margin says what a verdict on it is
MarginOf = Callable[[Any, torch.Tensor], torch.Tensor]
# (index into the batch, target classes, sample ids, target rank) -> (inputs, margins)
TargetedRun = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]
]


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per sample: negative means misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -math.inf)
    return true - others.amax(dim=1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)."""
    top = logits.topk(3, dim=1).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (APGD-T): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    top = logits.topk(4, dim=1).values
    gap = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, target[:, None])[:, 0]
    return -gap / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


# loss name -> per-sample objective (logits, labels) -> values to maximize
LOSSES: Dict[str, Objective] = {"ce": cross_entropy, "dlr": dlr_loss}


def evaluate_loss(
    model: Model,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    with_grad: bool = True,
    margin_of: MarginOf = margin,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(per-sample objective, margin, input gradient of the summed objective)."""
    if not with_grad:
        with torch.no_grad():
            logits = model(x_adv)
        return objective(logits, y), margin_of(logits, y), None
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    values = objective(logits, y)
    (grad,) = torch.autograd.grad(values.sum(), x_adv)
    with torch.no_grad():
        return values.detach(), margin_of(logits, y), grad


def num_classes(model: Model, sample: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(sample).shape[1])


class BestSoFar:
    """Per-sample lowest-margin iterate seen so far."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        self.margin = torch.full((len(x),), math.inf, device=x.device)

    def offer(self, x_adv: torch.Tensor, margins: torch.Tensor) -> None:
        better = margins < self.margin
        self.margin = torch.where(better, margins, self.margin)
        self.x = torch.where(per_sample(better, x_adv), x_adv.detach(), self.x)

    def offer_at(self, index: torch.Tensor, x_adv: torch.Tensor, margins: torch.Tensor) -> None:
        """offer() for the samples `index` of the batch."""
        better = margins < self.margin[index]
        self.margin[index] = torch.where(better, margins, self.margin[index])
        self.x[index] = torch.where(per_sample(better, x_adv), x_adv.detach(), self.x[index])


def over_targets(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    targets: int,
    sample_ids: Optional[torch.Tensor],
    run: TargetedRun,
    min_classes: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A targeted attack against each of the `targets` classes (all, where the model has
    fewer) the clean logits rank highest after the first, each only on the samples still
    not broken; per sample the lowest margin wins (AutoAttack's APGD-T and FAB-T)."""
    ids = torch.arange(len(x)) if sample_ids is None else torch.as_tensor(sample_ids)
    best = BestSoFar(x)
    if len(x) == 0:
        return best.x, best.margin
    with torch.no_grad():
        logits = model(x)
    classes = logits.shape[1]
    if classes < min_classes:
        raise GdwsError(f"the targeted attack needs at least {min_classes} classes, not {classes}")
    best.offer(x, margin(logits, y))
    ranked = logits.argsort(dim=1, descending=True)
    for rank in range(1, min(targets, classes - 1) + 1):
        active = (best.margin >= 0).nonzero()[:, 0]
        if len(active) == 0:
            break
        x_adv, margins = run(active, ranked[active, rank], ids[active.cpu()], rank)
        best.offer_at(active, x_adv, margins)
    return best.x, best.margin
