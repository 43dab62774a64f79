"""Adversarial examples crafted once on a reference model, to judge other models on.

A converted model attacked only through its own gradients can look more robust than it is:
a low-rank cut may merely mask the gradients PGD follows (benchmarks/transfer_check.py
measured converted VGG-16s at +2.6 points white-box that transfer from the original put
back at the original's level). Judging each sample also on the original's adversarial
example, and counting it robust only when the model survives both, takes the stronger
verdict per sample. The examples are crafted once, with the same per-sample seeds as the
white-box attacks, and reused for every model a search or sweep judges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from gdws_deploy.ir.graph import LoadedModel, load_model
from gdws_deploy.robustness.attacks import Attack, with_normalization, worst_case
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.device import resolve_device
from gdws_deploy.robustness.mirror import OnnxMirror


@dataclass(frozen=True)
class Transfer:
    """Adversarial inputs in data-set order (what `source` was attacked with, on every
    sample of the data set it was crafted on), and how reports name their source."""

    source: str
    x: np.ndarray


def crafted(
    target: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    attacks: Sequence[Attack],
    batch_size: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """Every sample of `dataset` after the worst case of `attacks` on `target` (on
    `device`), seeded by its index as evaluate's attacks are: the same whatever the
    batching."""
    batches = []
    for start, (x_batch, y_batch) in zip(
        range(0, len(dataset), batch_size), dataset.batches(batch_size)
    ):
        x, y = torch.from_numpy(x_batch).to(device), torch.from_numpy(y_batch).to(device)
        ids = torch.arange(start, start + len(y))
        batches.append(worst_case(target, x, y, attacks, ids, seed).x_adv.detach())
    return torch.cat(batches)


def transfer_from(
    model: Union[str, Path, LoadedModel],
    dataset: Dataset,
    attacks: Sequence[Attack],
    *,
    batch_size: int,
    seed: int,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    device: str = "cpu",
) -> Transfer:
    """`attacks` on `model`'s mirror (normalized by mean/std, on `device`), on every
    sample of `dataset`, seeded as evaluate's: what models converted from `model` are
    judged on too."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    resolved = resolve_device(device)
    mirror = OnnxMirror(loaded.model).eval()
    target = with_normalization(mirror, mean, std, dataset.x.shape[1]).to(resolved)
    with torch.no_grad():
        dataset.check_model(
            mirror.input_shapes[0],
            lambda sample: target(torch.from_numpy(sample).to(resolved)).shape[1],
        )
    x = crafted(target, dataset, attacks, batch_size, seed, resolved)
    name = Path(loaded.path).name if loaded.path is not None else "the original"
    return Transfer(name, x.cpu().numpy())
