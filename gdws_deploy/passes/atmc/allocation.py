"""How a whole-model MAC target is shared out as ranks across layers.

Each layer moves from dense in steps: the first step factors it at its largest rank n
that saves MACs (max_rank; saving M K - n (K + M) per pixel, less than one rank's cost),
each further step drops one rank (saving K + M per pixel). A step costs the share of
the layer's singular-value energy it drops: the tail beyond n for the first, sigma_r^2
for the drop from r. Steps are taken greedily by energy share lost per MAC saved, the
rule GKP's allocate_keep and GDWS's 'relative' allocation follow. GKP's steps are all
alike within a layer, these are not (the first is smaller and may cost more per MAC), so
the rule is written for steps of any size: a step's ratio is pooled with its layer's
earlier ones (their running maximum), so no step is ever taken before the one it
follows. The last step is chosen for the least overshoot: from where the greedy order
stands just short of the target, the fewest further steps of one layer that reach it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gdws_deploy.passes.gdws.allocation import UnreachableTargetError


def allocate_ranks(
    spectra: Sequence[np.ndarray],
    top_ranks: np.ndarray,
    dense_macs: np.ndarray,
    rank_macs: np.ndarray,
    total_macs: float,
    reduction: float,
) -> np.ndarray:
    """Rank of each layer (0: left dense) so that the model has at most
    total_macs / reduction MACs, dropping the least energy per MAC saved.

    spectra[l]: layer l's singular values, descending; top_ranks: (L,) each layer's
    max_rank (>= 1); dense_macs, rank_macs: (L,) its MACs dense and per rank.
    """
    top = np.asarray(top_ranks, dtype=np.int64)
    dense = np.asarray(dense_macs, dtype=np.float64)
    price = np.asarray(rank_macs, dtype=np.float64)
    need = total_macs - total_macs / reduction
    if need <= 0:
        return np.zeros(top.size, dtype=np.int64)
    shares = [_energy_shares(s) for s in spectra]
    # Step j of layer l: j = 0 factors it at rank top, j >= 1 drops rank top - j + 1.
    energy = np.concatenate([np.r_[e[n:].sum(), e[1:n][::-1]] for e, n in zip(shares, top)])
    owner = np.repeat(np.arange(top.size), top)
    depth = np.concatenate([np.arange(n) for n in top])
    saving = np.where(depth == 0, (dense - top * price)[owner], price[owner])
    ratio = np.concatenate(
        [np.maximum.accumulate(part) for part in np.split(energy / saving, np.cumsum(top)[:-1])]
    )
    order = np.lexsort((depth, ratio))
    saved = np.cumsum(saving[order])
    last = int(np.searchsorted(saved, need))
    if last == saved.size:
        best = total_macs / (total_macs - saved[-1])
        raise UnreachableTargetError(
            f"cannot reach {reduction:g}x fewer MACs: at most {best:.2f}x at rank 1"
        )
    taken = np.bincount(owner[order[:last]], minlength=top.size)
    short = need - (saved[last - 1] if last else 0.0)
    taken = _closing(taken, owner, depth, saving, energy, short)
    return np.where(taken > 0, top - taken + 1, 0)


def _energy_shares(singular: np.ndarray) -> np.ndarray:
    """Each singular value's share of the layer's energy (all 0 for a zero weight)."""
    energy = singular.astype(np.float64) ** 2
    total = energy.sum()
    return energy / total if total > 0 else energy


def _closing(
    taken: np.ndarray,
    owner: np.ndarray,
    depth: np.ndarray,
    saving: np.ndarray,
    energy: np.ndarray,
    short: float,
) -> np.ndarray:
    """`taken` (steps per layer) with the fewest further steps of one layer that save at
    least `short` MACs: the least overshoot, then the least energy."""
    ahead = depth >= taken[owner]
    within = np.cumsum(np.where(ahead, saving, 0.0))
    lost = np.cumsum(np.where(ahead, energy, 0.0))
    first = np.flatnonzero(depth == 0)  # each layer's first step
    base = within[first] - np.where(ahead, saving, 0.0)[first]
    lost_base = lost[first] - np.where(ahead, energy, 0.0)[first]
    further = within - base[owner]
    covers = ahead & (further >= short)
    pick = np.lexsort((lost - lost_base[owner], np.where(covers, further, np.inf)))[0]
    closed = taken.copy()
    closed[owner[pick]] = depth[pick] + 1
    return closed
