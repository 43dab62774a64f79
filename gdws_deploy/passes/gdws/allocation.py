"""Kernel budgets across layers: how a whole-model MAC target shares kernels out.

Layers' errors are not on one scale, so a rule decides what one kernel is worth in each
layer (ALLOCATIONS; benchmarks/allocation_rules.py compares them): greedy on an energy
per MAC, on a measured robust-loss curve per MAC, or one LEGO beta for every layer. Pure
numpy on the per-layer spectra of decompose.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.gdws.decompose import ChannelSpectra, GdwsFactors, mego


class UnreachableTargetError(GdwsError):
    """A MAC-reduction target that no allocation can meet (a search treats it as a bound)."""


@dataclass(frozen=True)
class LayerCost:
    """MACs of one layer: per kept kernel ((kh*kw + M) * H_out * W_out) and dense."""

    kernel_macs: int
    dense_macs: int


def allocate_budget(
    ranked_energies: Sequence[np.ndarray],
    costs: Sequence[LayerCost],
    fixed_macs: int,
    target_reduction: float,
    min_kernels: int = 1,
) -> list:
    """Kernels per layer (None: keep dense) for >= `target_reduction` fewer MACs overall.

    ranked_energies[l]: layer l's weighted energies in keep order (non-increasing);
    fixed_macs: MACs of everything that is not a candidate layer. Kernels are bought
    greedily by error saved per MAC spent; a layer whose GDWS form would cost as much as
    the dense conv goes back to dense (zero error, fewer MACs) and the freed MACs are
    spent again. Raises GdwsError when even one kernel per layer is too many.
    """
    kernel_macs, dense_macs, budget = _mac_budget(costs, fixed_macs, target_reduction)
    sizes = np.array([e.size for e in ranked_energies])
    floor = np.minimum(min_kernels, sizes)
    dense = floor * kernel_macs >= dense_macs
    while True:
        mandatory = fixed_macs + dense_macs[dense].sum() + (floor * kernel_macs)[~dense].sum()
        if mandatory > budget:
            best = (fixed_macs + dense_macs.sum()) / mandatory
            raise UnreachableTargetError(
                f"cannot reach {target_reduction:g}x fewer MACs: at most {best:.2f}x "
                f"with {min_kernels} kernel(s) per layer"
            )
        kept = floor + _greedy_picks(ranked_energies, kernel_macs, floor, dense, budget - mandatory)
        too_costly = ~dense & (kept * kernel_macs >= dense_macs)
        if not too_costly.any():
            return [None if d else int(k) for d, k in zip(dense, kept)]
        dense |= too_costly


def _mac_budget(
    costs: Sequence[LayerCost], fixed_macs: int, target_reduction: float
) -> Tuple[np.ndarray, np.ndarray, float]:
    """Per-layer MACs per kernel and dense, and the whole model's MAC budget."""
    if not target_reduction >= 1:
        raise GdwsError(f"MAC reduction must be >= 1, got {target_reduction}")
    kernel_macs = np.array([c.kernel_macs for c in costs], dtype=np.float64)
    dense_macs = np.array([c.dense_macs for c in costs], dtype=np.float64)
    return kernel_macs, dense_macs, (fixed_macs + dense_macs.sum()) / target_reduction


def _greedy_picks(
    ranked_energies: Sequence[np.ndarray],
    kernel_macs: np.ndarray,
    floor: np.ndarray,
    dense: np.ndarray,
    spare_macs: float,
) -> np.ndarray:
    """Extra kernels per layer bought with `spare_macs`, best error-per-MAC first."""
    layers = np.flatnonzero(~dense)
    optional = [ranked_energies[i][floor[i] :] for i in layers]
    owner = np.repeat(layers, [e.size for e in optional])
    energy = np.concatenate(optional) if optional else np.zeros(0)
    price = kernel_macs[owner]
    order = np.lexsort((np.arange(energy.size), -energy / price))
    affordable = int(np.searchsorted(np.cumsum(price[order]), spare_macs, side="right"))
    bought = min(affordable, int(np.count_nonzero(energy > 0)))
    return np.bincount(owner[order[:bought]], minlength=len(ranked_energies))


# Whole-model MAC targets: how kernels are shared out across layers. Measured on the
# bundled robust model and a digits model by benchmarks/allocation_rules.py (README).
ALLOCATIONS: Dict[str, str] = {
    "auto": "without data relative; convert --dataset converts under relative and measured "
    "and keeps relative unless measured is significantly more robust on the data; sweep "
    "--calib uses measured",
    "measured": "greedy on each layer's measured robust-loss curve per MAC",
    "relative": "greedy on s^2 / ||W||_F^2 of its layer per MAC (scale-free)",
    "energy": "greedy on unweighted s^2 per MAC",
    "alpha": "greedy on alpha-weighted s^2 per MAC (eq. 8 alphas)",
    "lego": "per-layer LEGO with one beta, the least that reaches the target",
}
# The rules that pick kernels inside a layer by alpha-weighted energy.
USES_ALPHAS = ("alpha", "lego")
# A flat stretch of a measured curve orders its kernels by energy, at this fraction of the
# curve's range: enough to break ties, too little to reorder what was measured.
_TIE_BREAK = 1e-6


@dataclass(frozen=True)
class LossCurve:
    """How much a robust loss grows when only this layer is cut to `counts[i]` kernels.

    counts: (n,) strictly increasing, from 0 (the layer zeroed), kernels taken in
    unweighted keep order; losses: (n,) the measured increase at each count.
    """

    counts: np.ndarray
    losses: np.ndarray


def resolve_allocation(allocation: str, has_curves: bool, speed_goal: bool = False) -> str:
    """The rule `allocation` names; "auto" is measured given loss curves, else relative,
    and relative under a speed goal: its options cut layers to one kernel per channel,
    where losses measured one layer at a time stop adding up (on the bundled model at 2x,
    --speed-ratio 0.8: 17 % robust by measured curves, 54 % by relative)."""
    if allocation not in ALLOCATIONS:
        raise GdwsError(f"unknown allocation {allocation!r} (choose from {', '.join(ALLOCATIONS)})")
    if allocation == "auto":
        return "measured" if has_curves and not speed_goal else "relative"
    return allocation


def allocate(
    allocation: str,
    spectra: Sequence[ChannelSpectra],
    costs: Sequence[LayerCost],
    fixed_macs: int,
    target_reduction: float,
    alphas: Optional[Sequence[Optional[np.ndarray]]] = None,
    curves: Optional[Sequence[LossCurve]] = None,
) -> List[Optional[GdwsFactors]]:
    """Factors per layer (None: keep dense) for >= `target_reduction` fewer MACs.

    allocation: a name from ALLOCATIONS; alphas[l]: (C,) channel weights of layer l (the
    alpha and lego rules); curves[l]: layer l's measured LossCurve (the measured rule).
    """
    rule = resolve_allocation(allocation, curves is not None)
    count = len(spectra)
    alphas = list(alphas) if alphas is not None else [None] * count
    if rule == "alpha" and any(a is None for a in alphas):
        raise GdwsError("allocation 'alpha' needs alphas for every layer")
    if rule == "measured" and (curves is None or len(curves) != count):
        raise GdwsError("allocation 'measured' needs a loss curve for every layer")
    weights = alphas if rule in USES_ALPHAS else [None] * count
    if rule == "lego":
        ranked = [s.ranked_energies(a) for s, a in zip(spectra, weights)]
        kernels = allocate_by_beta(ranked, costs, fixed_macs, target_reduction)
    else:
        ranked = [
            _allocation_energies(rule, s, a, curves and curves[i])
            for i, (s, a) in enumerate(zip(spectra, weights))
        ]
        kernels = allocate_budget(ranked, costs, fixed_macs, target_reduction)
    return [None if k is None else mego(s, k, a) for s, a, k in zip(spectra, weights, kernels)]


def _allocation_energies(
    rule: str, spectra: ChannelSpectra, alpha: Optional[np.ndarray], curve: Optional[LossCurve]
) -> np.ndarray:
    """What the greedy of `rule` buys kernels by, in keep order (non-increasing)."""
    if rule == "measured":
        return curve_gains(curve, spectra)
    ranked = spectra.ranked_energies(alpha)
    if rule == "relative":
        return ranked / max(spectra.total_energy, np.finfo(float).tiny)
    return ranked


def curve_gains(curve: LossCurve, spectra: ChannelSpectra) -> np.ndarray:
    """Per kernel in unweighted keep order, the robust loss it saves; (C*r,) non-increasing.

    The curve, extended to (all C*r terms, 0), is replaced by its lower convex hull, so the
    gains never grow along the keep order and interpolate linearly between measurements.
    Where the hull is flat, a tiny share of each term's energy keeps kernels ordered.
    """
    size = spectra.s.size
    counts = np.asarray(curve.counts, dtype=np.int64)
    losses = np.asarray(curve.losses, dtype=np.float64)
    if counts.ndim != 1 or counts.shape != losses.shape or counts.size == 0:
        raise GdwsError("a loss curve needs matching 1-D counts and losses")
    if counts[0] != 0 or np.any(np.diff(counts) <= 0) or counts[-1] >= size:
        raise GdwsError(f"loss curve counts must rise from 0 to below {size}, got {counts}")
    if not np.all(np.isfinite(losses)):
        raise GdwsError("loss curve has NaN or infinite losses")
    counts = np.append(counts, size)
    losses = np.append(np.maximum(losses, 0.0), 0.0)
    hull = _lower_hull(counts, losses)
    widths = np.diff(counts[hull])
    gains = np.repeat(-np.diff(losses[hull]) / widths, widths)
    energy = spectra.ranked_energies()
    scale = _TIE_BREAK * max(losses.max(), np.finfo(float).tiny)
    return gains + scale * energy / max(energy.sum(), np.finfo(float).tiny)


def _lower_hull(x: np.ndarray, y: np.ndarray) -> List[int]:
    """Indices of the lower convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: List[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) < (y[i] - y[a]) * (x[b] - x[a]):
                break
            hull.pop()
        hull.append(i)
    return hull


def allocate_by_beta(
    ranked_energies: Sequence[np.ndarray],
    costs: Sequence[LayerCost],
    fixed_macs: int,
    target_reduction: float,
    min_kernels: int = 1,
) -> list:
    """Kernels per layer (None: keep dense) from LEGO with one beta for every layer.

    Each layer keeps the fewest kernels whose weighted error stays <= beta (at least
    `min_kernels`; dense where GDWS would not save MACs); beta is the least one that
    gives >= `target_reduction` fewer MACs, found exactly among the values where some
    layer's count changes (MACs fall as beta grows). Raises GdwsError when no beta can.
    """
    kernel_macs, dense_macs, budget = _mac_budget(costs, fixed_macs, target_reduction)
    # dropped[l][d]: error of layer l after dropping its d least worth keeping terms
    dropped = [np.concatenate(([0.0], np.cumsum(e[::-1]))) for e in ranked_energies]
    betas = np.unique(np.concatenate(dropped))
    kept = np.stack(
        [
            np.maximum(
                d.size - np.searchsorted(d, betas, side="right"), min(min_kernels, d.size - 1)
            )
            for d in dropped
        ]
    )  # (layers, betas)
    dense = kept * kernel_macs[:, None] >= dense_macs[:, None]
    total = fixed_macs + np.where(dense, dense_macs[:, None], kept * kernel_macs[:, None]).sum(0)
    reaching = np.flatnonzero(total <= budget)
    if reaching.size == 0:
        best = (fixed_macs + dense_macs.sum()) / total.min()
        raise UnreachableTargetError(
            f"cannot reach {target_reduction:g}x fewer MACs: at most {best:.2f}x "
            f"with {min_kernels} kernel(s) per layer"
        )
    chosen = reaching[0]
    return [None if dense[i, chosen] else int(kept[i, chosen]) for i in range(len(dropped))]
