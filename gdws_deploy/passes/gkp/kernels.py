"""Grouped kernel pruning (Zhong et al., NeurIPS 2023), the math: numpy only.

A Conv weight W (M, C, kh, kw) is cut into n filter groups of M/n filters each; every
group keeps the same number k of its C input channels ("grouped kernels": the group's
kernels of one input channel), so the layer becomes a Conv with group = n over the kept
channels, k/C of the dense MACs. Three steps, as in the authors' code
(henryzhongsc/adv_robust_gkp), written here array-wise:

1. roughness: each kernel's sum over its cells of |w_a^2 - w_b^2| for the 8 neighbours b
   of each cell a (their `adj_diff_sum`, p = 2; every neighbour pair counts twice).
2. snake_groups: filters ordered by roughness (1x1 kernels: by magnitude, the L1 norm,
   largest first), dealt to the n groups in snaking order (0..n-1, n-1..0, ...), so every
   group gets smooth and rough filters alike.
3. beam_keep: per group, the k grouped kernels kept by a beam search from every start:
   each step adds the `width` candidates least similar (similarity = 1 - Euclidean
   distance) to those chosen; every `check_step` steps the beam is cut back to `width`
   by ranks of an outer cost (kept pairs' similarity minus the pruned kernels' best
   similarity to a kept one, pairs/pruned balancing the two sums) weighted `balance`, and
   of roughness weighted 1 - balance; the final pick is the least outer cost of all beams.

Deviations from their code, each for a reason: k = round((1 - p) * C) (theirs:
int((1 - p) * (C + 1)), which equals it at their p = 7/16); the outer cost's balancer is
recomputed for every selection size (theirs is fixed at its first evaluation, a
`nonlocal` side effect) and is 1 with a single kept kernel (pairs = 0 would ignore the
pruned kernels and always keep channel 0); ranks give ties the same rank; 1x1 kernels use
the same search (roughness is 0 for all, so only similarity decides; theirs switches to a
greedy search); a filter count that 8 does not divide gets gcd(M, 8) groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Filter groups per layer (the paper's n = 8), beam width, how often the beam is cut
# back, and the weight of similarity against smoothness there (their settings).
GROUPS = 8
BEAM_WIDTH = 2
CHECK_STEP = 3
BALANCE = 0.9
# Neighbour offsets that, each counted twice, give all 8 neighbours of every cell.
_HALF_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))


@dataclass(frozen=True)
class GkpFactors:
    """One layer's grouped form.

    order: (M,) original filter indices, group g being order[g*M/n:(g+1)*M/n];
    kept: (n, k) the input channels each group keeps, ascending; weight: (M, k, kh, kw)
    the grouped Conv's weight, filters in `order`; error: the squared energy of the
    pruned kernels (||W - W masked||_F^2).
    """

    order: np.ndarray
    kept: np.ndarray
    weight: np.ndarray
    error: float

    @property
    def groups(self) -> int:
        return self.kept.shape[0]

    @property
    def keep(self) -> int:
        """Input channels kept per group."""
        return self.kept.shape[1]

    def masked(self, weight: np.ndarray) -> np.ndarray:
        """`weight` (M, C, kh, kw) with the pruned kernels zeroed: what the grouped form
        computes as a dense Conv."""
        mask = np.zeros(weight.shape[:2], dtype=bool)
        filters = self.order.reshape(self.groups, -1)
        mask[filters[:, :, None], self.kept[:, None, :]] = True
        return np.where(mask[:, :, None, None], weight, 0).astype(weight.dtype)


def kept_count(channels: int, prune: float) -> int:
    """Kernels each group keeps of `channels` at pruning share `prune`: round((1-p)*C),
    at least one."""
    return min(channels, max(1, math.floor((1 - prune) * channels + 0.5)))


def group_count(filters: int, groups: int = GROUPS) -> int:
    """Filter groups of a layer with `filters` output channels: the most, up to `groups`,
    that split them evenly."""
    return math.gcd(filters, groups)


def roughness(kernels: np.ndarray) -> np.ndarray:
    """kernels (..., kh, kw) -> (...): sum over cells and their 8 neighbours of
    |w_a^2 - w_b^2| (0 for 1x1 kernels). Smaller is smoother."""
    square = np.asarray(kernels, dtype=np.float64) ** 2
    kh, kw = square.shape[-2:]
    total = np.zeros(square.shape[:-2])
    for dy, dx in _HALF_NEIGHBOURS:
        a = square[..., : kh - dy, max(0, -dx) : kw - max(0, dx)]
        b = square[..., dy:, max(0, dx) : kw - max(0, -dx)]
        total += np.abs(a - b).sum(axis=(-2, -1))
    return 2 * total


def snake_groups(scores: np.ndarray, groups: int) -> np.ndarray:
    """(M,) scores -> (groups, M/groups) filter indices: ranked by ascending score and
    dealt in snaking order, each group's filters in their original order."""
    count = scores.shape[0]
    rank = np.empty(count, dtype=np.int64)
    rank[np.argsort(scores, kind="stable")] = np.arange(count)
    row, column = np.divmod(rank, groups)
    label = np.where(row % 2 == 0, column, groups - 1 - column)
    return np.argsort(label, kind="stable").reshape(groups, -1)


def filter_groups(weight: np.ndarray, groups: int) -> np.ndarray:
    """weight (M, C, kh, kw) -> (groups, M/groups) filter indices: by roughness, or by
    magnitude (largest first) for 1x1 kernels."""
    if weight.shape[2:] == (1, 1):
        scores = -np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1).sum(axis=1)
    else:
        scores = roughness(weight).sum(axis=1)
    return snake_groups(scores, groups)


def beam_keep(
    features: np.ndarray,
    rough: np.ndarray,
    keep: int,
    width: int = BEAM_WIDTH,
    balance: float = BALANCE,
    check_step: int = CHECK_STEP,
) -> np.ndarray:
    """The `keep` grouped kernels of one group to keep, ascending.

    features: (C, D) each grouped kernel flattened; rough: (C,) their roughness. Every
    start runs at once: the state is (starts, beam entries, C).
    """
    channels = features.shape[0]
    if keep >= channels:
        return np.arange(channels)
    norms = np.einsum("cd,cd->c", features, features)
    squared = norms[:, None] + norms[None, :] - 2 * features @ features.T
    similar = 1.0 - np.sqrt(np.maximum(squared, 0.0))
    # per (start, entry, channel): similarity summed over the chosen (inf: chosen itself)
    # and the best similarity to a chosen one; per (start, entry): similarity summed over
    # chosen pairs, roughness summed over the chosen
    total = np.where(np.eye(channels, dtype=bool), np.inf, similar)[:, None, :]
    best = similar[:, None, :].copy()
    inner = np.zeros((channels, 1))
    smooth = rough[:, None].astype(np.float64)
    starts = np.arange(channels)[:, None]
    for step in range(1, keep):
        picks = _least(total, min(width, channels - step))
        parent = np.repeat(np.arange(total.shape[1]), picks.shape[-1])
        pick = picks.reshape(channels, -1)
        entries = np.arange(pick.shape[1])
        total = total[:, parent]
        inner = inner[:, parent] + total[starts, entries, pick]
        rows = similar[pick]
        total += rows
        total[starts, entries, pick] = np.inf
        best = np.maximum(best[:, parent], rows)
        smooth = smooth[:, parent] + rough[pick]
        if step % check_step == 0 and total.shape[1] > width:
            score = balance * _rank(_outer_cost(total, inner, best, step + 1))
            score += (1 - balance) * _rank(smooth)
            survivors = np.argsort(-score, axis=1, kind="stable")[:, :width]
            total = np.take_along_axis(total, survivors[:, :, None], 1)
            best = np.take_along_axis(best, survivors[:, :, None], 1)
            inner = np.take_along_axis(inner, survivors, 1)
            smooth = np.take_along_axis(smooth, survivors, 1)
    final = np.argmin(_outer_cost(total, inner, best, keep).reshape(-1))
    return np.flatnonzero(np.isinf(total.reshape(-1, channels)[final]))


def prune_layer(
    weight: np.ndarray,
    keep: int,
    groups: int = GROUPS,
    width: int = BEAM_WIDTH,
    balance: float = BALANCE,
) -> GkpFactors:
    """weight (M, C, kh, kw) -> its grouped form keeping `keep` kernels per filter group
    (group_count(M, groups) groups)."""
    out, channels = weight.shape[:2]
    count = group_count(out, groups)
    members = filter_groups(weight, count)  # (n, M/n)
    grouped = weight[members].astype(np.float64)  # (n, M/n, C, kh, kw)
    features = grouped.transpose(0, 2, 1, 3, 4).reshape(count, channels, -1)
    rough = roughness(grouped).sum(axis=1)  # (n, C)
    kept = np.stack(
        [beam_keep(f, r, keep, width, balance) for f, r in zip(features, rough)]
    )  # a loop over the n groups; each search is vectorized over channels and starts
    energy = (grouped**2).sum(axis=(1, 3, 4))  # (n, C)
    error = float(energy.sum() - np.take_along_axis(energy, kept, 1).sum())
    order = members.reshape(-1)
    owner = np.repeat(np.arange(count), out // count)
    reduced = weight[order[:, None], kept[owner]]  # (M, k, kh, kw)
    return GkpFactors(order, kept, reduced, error)


def cut_energy(weight: np.ndarray, groups: int = GROUPS) -> np.ndarray:
    """weight (M, C, kh, kw) -> (C,): the share of the layer's energy at least lost when
    each filter group prunes j = 0..C-1 kernels (its j least energetic ones): what the
    MAC allocation charges a layer for pruning deeper."""
    members = filter_groups(weight, group_count(weight.shape[0], groups))
    energy = (weight[members].astype(np.float64) ** 2).sum(axis=(1, 3, 4))  # (n, C)
    lost = np.cumsum(np.sort(energy, axis=1), axis=1).sum(axis=0)
    whole = energy.sum()
    return np.concatenate([[0.0], lost[:-1]]) / (whole if whole > 0 else 1.0)


def _outer_cost(total: np.ndarray, inner: np.ndarray, best: np.ndarray, kept: int) -> np.ndarray:
    """(starts, entries): kept pairs' similarity minus the balanced sum of each pruned
    kernel's best similarity to a kept one (lower: diverse kept, well-covered pruned);
    `total` is inf at the kept channels."""
    pruned = total.shape[-1] - kept
    pairs = kept * (kept - 1) // 2
    balancer = pairs / pruned if pairs and pruned else 1.0
    covered = np.sum(best, axis=-1, where=np.isfinite(total))
    return inner - balancer * covered


def _least(cost: np.ndarray, count: int) -> np.ndarray:
    """(..., C) -> (..., count): the indices of the `count` smallest, smallest first
    (count is the beam width: a loop of argmin is faster than a partition)."""
    scratch = cost.copy()
    picks = []
    for _ in range(count):
        pick = scratch.argmin(axis=-1)[..., None]
        np.put_along_axis(scratch, pick, np.inf, axis=-1)
        picks.append(pick)
    return np.concatenate(picks, axis=-1)


def _rank(values: np.ndarray) -> np.ndarray:
    """Per row, how many entries are larger (ties share a rank): the larger the value,
    the lower its rank."""
    return (values[:, None, :] > values[:, :, None]).sum(axis=-1).astype(np.float64)
