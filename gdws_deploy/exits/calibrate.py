"""Entropy thresholds per exit: the most accurate policy whose expected MACs fit a budget.

On clean calibration data every exit's logits are computed once; a policy (one threshold
per early exit) then sends each sample out at its first exit with entropy <= threshold,
and costs the cumulative MACs of that exit. Two schemes:
  quantile  the paper's (Hu et al., ICLR 2020): one share q; at each exit the q most
            confident of the samples still there leave; q on a grid.
  search    every combination of per-exit entropy quantiles on a grid (the quantile
            scheme's candidates included, so it is never worse on the calibration data),
            evaluated at once in numpy.
The pick has the best accuracy among the policies with expected MACs <= budget x the
single-pass model's; ties go to the cheaper one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import onnx

from gdws_deploy.atomic import check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.exits.split import SplitModel, split_model
from gdws_deploy.ir.graph import load_model, save_model
from gdws_deploy.runtime.staged import CLOSED, METADATA_KEY, ExitPolicy, StagedModel, entropy

SCHEMES = ("search", "quantile")
GRID = 40  # quantile levels per exit: 1/GRID, 2/GRID, ..., 1 (and the closed exit)
MAX_POLICIES = 250_000  # the search grid shrinks so that many policies are evaluated at most
_CHUNK_ELEMENTS = 2**24  # policies x samples x exits evaluated per numpy step


@dataclass(frozen=True)
class Calibration:
    """The chosen thresholds and what they give on the calibration data.

    exit_shares: the share of samples leaving at each exit; expected_share: expected MACs
    over the single-pass model's; policies: how many were evaluated.
    """

    thresholds: Tuple[float, ...]
    accuracy: float
    expected_share: float
    exit_shares: Tuple[float, ...]
    scheme: str
    policies: int


def check_budget(budget: float) -> None:
    if not (np.isfinite(budget) and 0 < budget <= 1):
        raise GdwsError(f"--budget must be in (0, 1] (a share of the model's MACs), got {budget:g}")


def calibrate_thresholds(
    logits_per_exit: Sequence[np.ndarray],
    labels: np.ndarray,
    policy: ExitPolicy,
    budget: float,
    scheme: str = "search",
    grid: int = GRID,
) -> Calibration:
    """The best policy within `budget` (share of policy.full_macs) on these logits.

    logits_per_exit: K arrays (N, classes), the final exit last; labels: (N,).
    """
    check_budget(budget)
    if scheme not in SCHEMES:
        raise GdwsError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if len(labels) == 0:
        raise GdwsError("calibration needs at least one sample")
    entropies = np.stack([entropy(z) for z in logits_per_exit[:-1]], axis=1)  # (N, K-1)
    correct = np.stack([z.argmax(axis=1) == labels for z in logits_per_exit])  # (K, N)
    candidates = _quantile_scheme(entropies, grid)
    if scheme == "search":
        candidates = np.concatenate([candidates, _search_grid(entropies, grid)])
    cost = np.asarray(policy.stage_macs, dtype=np.float64) / policy.full_macs
    accuracy, share, exits = _evaluate(candidates, entropies, correct, cost)
    feasible = share <= budget * (1 + 1e-12)
    if not feasible.any():
        raise GdwsError(
            f"no policy meets the budget {budget:g}: even every sample leaving at exit 0 "
            f"costs {cost[0]:.3g} of the model's MACs"
        )
    order = np.lexsort((share, -accuracy, ~feasible))  # feasible, most accurate, cheapest
    best = int(order[0])
    shares = np.bincount(exits[best], minlength=len(logits_per_exit)) / len(labels)
    return Calibration(
        tuple(float(t) for t in candidates[best]),
        float(accuracy[best]),
        float(share[best]),
        tuple(float(s) for s in shares),
        scheme,
        len(candidates),
    )


def _quantile_scheme(entropies: np.ndarray, grid: int) -> np.ndarray:
    """(grid + 1, K-1) thresholds: at each exit the share q of the samples still there
    with the lowest entropy leave, q = 0, 1/grid, ..., 1 (q = 0: the exit is closed)."""
    q = np.linspace(0.0, 1.0, grid + 1)
    count = len(entropies)
    staying = np.ones((len(q), count), dtype=bool)
    thresholds = np.full((len(q), entropies.shape[1]), CLOSED)
    for k in range(entropies.shape[1]):  # exits in turn: each sees the previous ones' leavers
        ranked = np.sort(np.where(staying, entropies[:, k], np.inf), axis=1)
        left = staying.sum(axis=1)
        take = np.ceil(q * left).astype(np.int64)
        picked = ranked[np.arange(len(q)), np.clip(take - 1, 0, count - 1)]
        thresholds[:, k] = np.where(take > 0, picked, CLOSED)
        staying &= ~(entropies[:, k] <= thresholds[:, k : k + 1])
    return thresholds


def _search_grid(entropies: np.ndarray, grid: int) -> np.ndarray:
    """Every combination of per-exit thresholds at entropy quantiles (and closed); the
    grid coarsens so that at most MAX_POLICIES combinations are made."""
    gated = entropies.shape[1]
    levels = min(grid, max(1, int(MAX_POLICIES ** (1 / gated)) - 1))
    q = np.linspace(1 / levels, 1.0, levels)
    per_exit = np.quantile(entropies, q, axis=0, method="inverted_cdf")  # (levels, K-1)
    values = np.vstack([np.full((1, gated), CLOSED), per_exit])
    index = np.stack(np.meshgrid(*[np.arange(len(values))] * gated, indexing="ij"), axis=-1)
    index = index.reshape(-1, gated)
    return values[index, np.arange(gated)]


def _evaluate(
    candidates: np.ndarray, entropies: np.ndarray, correct: np.ndarray, cost: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy (P,), expected MAC share (P,) and exits taken (P, N) of every policy."""
    count, gated = entropies.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(1, count * gated))
    exits = np.empty((len(candidates), count), dtype=np.int64)
    for start in range(0, len(candidates), chunk):
        block = candidates[start : start + chunk]
        passes = entropies[None, :, :] <= block[:, None, :]  # (P, N, K-1)
        first = passes.argmax(axis=2)
        exits[start : start + chunk] = np.where(passes.any(axis=2), first, gated)
    accuracy = correct[exits, np.arange(count)].mean(axis=1)
    return accuracy, cost[exits].mean(axis=1), exits


def calibrate_model(
    model: Union[str, Path],
    output: Union[str, Path],
    images: np.ndarray,
    labels: np.ndarray,
    budget: float,
    *,
    dataset: str,
    scheme: str = "search",
    batch_size: int = 256,
    threads: int = 0,
) -> Tuple[Calibration, ExitPolicy]:
    """Calibrate a multi-exit ONNX model on (images, labels) and write it to `output` with
    the policy in its metadata (METADATA_KEY); the input file is never changed."""
    check_budget(budget)
    check_output_path(output, model)
    loaded = load_model(model)
    split = split_model(loaded)
    logits = exit_logits(split, images, batch_size, threads)
    chosen = calibrate_thresholds(logits, labels, split.policy, budget, scheme)
    policy = split.policy.with_thresholds(
        chosen.thresholds,
        budget=budget,
        calibration=dataset,
        scheme=scheme,
        calibration_accuracy=chosen.accuracy,
        expected_share=chosen.expected_share,
    )
    written = onnx.ModelProto()
    written.CopyFrom(loaded.model)
    entries = [e for e in written.metadata_props if e.key != METADATA_KEY]
    del written.metadata_props[:]
    written.metadata_props.extend(entries)
    written.metadata_props.add(key=METADATA_KEY, value=policy.to_json())
    save_model(written, output, like=loaded)
    return chosen, policy


def exit_logits(
    split: SplitModel,
    images: np.ndarray,
    batch_size: int,
    threads: int = 0,
) -> List[np.ndarray]:
    """Every exit's logits on `images`, the stages run in onnxruntime batch by batch."""
    files = [stage.model.SerializeToString() for stage in split.stages]
    closed = [CLOSED] * (len(files) - 1)
    staged = StagedModel.from_files(files, split.specs(), split.policy, closed, threads=threads)
    with staged:
        parts = [
            staged.exit_logits(images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        ]
    return [np.concatenate([part[k] for part in parts]) for k in range(len(files))]
