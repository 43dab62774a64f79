"""GDWS math: per-input-channel SVD, LEGO, MEGO and a kernel budget across layers.

Pure numpy, no ONNX. A conv weight W (M, C, kh, kw) is split per input channel c
into W_c (M, k), k = kh*kw, with SVD W_c = sum_i s_ci u_ci v_ci^T. A GDWS conv keeps
some rank-1 terms: each is one depthwise kernel v_ci on channel c and one pointwise
column s_ci*u_ci. Dropping term (c, i) costs alpha_c * s_ci^2 of weighted error, so
keeping the terms of largest weighted energy is exactly optimal (Eckart-Young per
channel); LEGO and MEGO differ only in where they stop.

A whole-model MAC target needs a rule for sharing kernels out across layers, whose
errors are not on one scale (ALLOCATIONS; benchmarks/allocation_rules.py compares them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from gdws_deploy.errors import GdwsError


@dataclass(frozen=True)
class ChannelSpectra:
    """Per-input-channel SVD of a conv weight, computed once and reused.

    u: (C, M, r), s: (C, r) descending, vt: (C, r, kh*kw), r = min(M, kh*kw).
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    kernel_shape: Tuple[int, int]
    dtype: np.dtype

    @classmethod
    def from_weight(cls, weight: np.ndarray) -> ChannelSpectra:
        """One batched SVD over all input channels of `weight` (M, C, kh, kw)."""
        w = np.asarray(weight)
        if w.ndim != 4 or 0 in w.shape:
            raise GdwsError(f"conv weight must be a non-empty (M, C, kh, kw) array, got {w.shape}")
        if not np.issubdtype(w.dtype, np.floating):
            raise GdwsError(f"conv weight must be floating point, got {w.dtype}")
        if not np.all(np.isfinite(w)):
            raise GdwsError("conv weight contains NaN or infinity")
        m, c, kh, kw = w.shape
        per_channel = w.transpose(1, 0, 2, 3).reshape(c, m, kh * kw).astype(np.float64)
        u, s, vt = np.linalg.svd(per_channel, full_matrices=False)
        return cls(u, s, vt, (kh, kw), w.dtype)

    @property
    def in_channels(self) -> int:
        return self.s.shape[0]

    @property
    def out_channels(self) -> int:
        return self.u.shape[1]

    @property
    def rank(self) -> int:
        """Rank-1 terms available per channel, min(M, kh*kw)."""
        return self.s.shape[1]

    def energies(self, alpha: Optional[np.ndarray] = None) -> np.ndarray:
        """Weighted energy alpha_c * s_ci^2 of every term, (C, r)."""
        return _channel_weights(alpha, self.in_channels)[:, None] * self.s**2

    def keep_order(self, alpha: Optional[np.ndarray] = None) -> np.ndarray:
        """Flat term indices (c*r + i), most worth keeping first.

        Ties go to the lower channel, then the lower term index, so every prefix keeps
        a prefix of each channel's terms and results are deterministic.
        """
        energy = self.energies(alpha).ravel()
        flat = np.arange(energy.size)
        return np.lexsort((flat % self.rank, flat // self.rank, -energy))

    def ranked_energies(self, alpha: Optional[np.ndarray] = None) -> np.ndarray:
        """Weighted energies in keep order, (C*r,) non-increasing."""
        return self.energies(alpha).ravel()[self.keep_order(alpha)]

    def dropped_energy(self, per_channel: int, alpha: Optional[np.ndarray] = None) -> float:
        """Weighted energy of the terms past the first `per_channel` of every channel."""
        weights = _channel_weights(alpha, self.in_channels)
        return float(weights @ np.sum(self.s[:, per_channel:] ** 2, axis=1))

    @property
    def total_energy(self) -> float:
        """||W||_F^2, the sum of every s_ci^2."""
        return float(np.sum(self.s**2))

    def round_off_energy(self, alpha: Optional[np.ndarray] = None) -> float:
        """Weighted energy that rounding alone can put past a weight's true rank.

        Storing W in its dtype moves every entry by at most u = eps/2 of itself, so a
        weight of exact rank R per channel keeps at most u^2 ||W_c||^2 beyond rank R
        (Eckart-Young: the rounding is one rank-R approximation of it). The float64 SVD is
        backward stable: each computed s_ci is off by at most about max(M, k) * eps64 *
        ||W_c|| (Weyl), at most r such terms. So the dropped energy that is round-off, not
        signal, is at most (u + sqrt(r) max(M, k) eps64)^2 * sum_c alpha_c ||W_c||^2.
        """
        taps = self.kernel_shape[0] * self.kernel_shape[1]
        svd = np.sqrt(self.rank) * max(self.out_channels, taps) * np.finfo(np.float64).eps
        amplitude = np.finfo(self.dtype).eps / 2 + svd
        return float(amplitude**2 * self.energies(alpha).sum())


@dataclass(frozen=True)
class GdwsFactors:
    """The factors of one GDWS conv.

    channels: (G,) input channel of each depthwise kernel, sorted;
    depthwise: (G, kh, kw); pointwise: (M, G); error: the weighted squared error
    incurred, sum over dropped terms of alpha_c * s_ci^2.
    """

    channels: np.ndarray
    depthwise: np.ndarray
    pointwise: np.ndarray
    error: float
    in_channels: int

    @property
    def kernels(self) -> int:
        """G, the number of depthwise kernels."""
        return int(self.channels.size)

    def kernels_per_channel(self) -> np.ndarray:
        """(C,) how many depthwise kernels each input channel keeps."""
        return np.bincount(self.channels, minlength=self.in_channels)

    def to_dense(self) -> np.ndarray:
        """The (M, C, kh, kw) weight these factors represent."""
        g, kh, kw = self.depthwise.shape
        m = self.pointwise.shape[0]
        terms = self.pointwise.T[:, :, None] * self.depthwise.reshape(g, 1, kh * kw)
        dense = np.zeros((self.in_channels, m, kh * kw), dtype=np.result_type(terms, np.float32))
        np.add.at(dense, self.channels, terms)
        return dense.reshape(self.in_channels, m, kh, kw).transpose(1, 0, 2, 3)


WeightOrSpectra = Union[np.ndarray, ChannelSpectra]


class SpectraCache:
    """ChannelSpectra by layer name, so callers that convert one model many times (a
    search, a sweep) pay one batched SVD per layer in all. An entry is reused only while
    the layer's weight is unchanged."""

    def __init__(self) -> None:
        self._entries: Dict[str, Tuple[np.ndarray, ChannelSpectra]] = {}
        self.computed = 0  # SVDs run, for callers that report or check the reuse

    def get(self, name: str, weight: np.ndarray) -> ChannelSpectra:
        entry = self._entries.get(name)
        if (
            entry is not None
            and entry[0].shape == weight.shape
            and np.array_equal(entry[0], weight)
        ):
            return entry[1]
        spectra = ChannelSpectra.from_weight(weight)
        self._entries[name] = (weight, spectra)
        self.computed += 1
        return spectra


class UnreachableTargetError(GdwsError):
    """A MAC-reduction target that no allocation can meet (a search treats it as a bound)."""


def lego(
    weight: WeightOrSpectra,
    beta: float,
    alpha: Optional[np.ndarray] = None,
    min_kernels: int = 1,
) -> GdwsFactors:
    """LEGO: the fewest depthwise kernels whose weighted error stays <= beta.

    weight: (M, C, kh, kw) or its ChannelSpectra; alpha: (C,) channel weights, None for
    ones. At least `min_kernels` are kept so the layer never vanishes (the error is then
    below beta). Error within round-off of beta meets it (ChannelSpectra.round_off_energy),
    so beta = 0 drops exactly the terms beyond each channel's rank.
    """
    if not np.isfinite(beta) or beta < 0:
        raise GdwsError(f"beta must be a finite number >= 0, got {beta}")
    spectra = _spectra(weight)
    ranked = spectra.ranked_energies(alpha)
    dropped_error = np.cumsum(ranked[::-1])
    droppable = _droppable(dropped_error, beta + spectra.round_off_energy(alpha))
    keep = max(ranked.size - droppable, min(min_kernels, ranked.size))
    return _truncate(spectra, alpha, keep, dropped_error)


def mego(
    weight: WeightOrSpectra,
    budget: int,
    alpha: Optional[np.ndarray] = None,
) -> GdwsFactors:
    """MEGO: the least weighted error with at most `budget` depthwise kernels.

    weight: (M, C, kh, kw) or its ChannelSpectra; alpha: (C,) channel weights, None for
    ones. Terms whose energy is zero or round-off are never kept: they add kernels, not
    accuracy.
    """
    if int(budget) != budget or budget < 1:
        raise GdwsError(f"budget must be a whole number of kernels >= 1, got {budget}")
    spectra = _spectra(weight)
    ranked = spectra.ranked_energies(alpha)
    dropped_error = np.cumsum(ranked[::-1])
    useful = max(ranked.size - _droppable(dropped_error, spectra.round_off_energy(alpha)), 1)
    keep = min(int(budget), useful)
    return _truncate(spectra, alpha, keep, dropped_error)


def _droppable(dropped_error: np.ndarray, bound: float) -> int:
    """How many terms can go from the end of the keep order with error <= bound."""
    return int(np.searchsorted(dropped_error, bound, side="right"))


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


def _spectra(weight: WeightOrSpectra) -> ChannelSpectra:
    if isinstance(weight, ChannelSpectra):
        return weight
    return ChannelSpectra.from_weight(weight)


def _channel_weights(alpha: Optional[np.ndarray], channels: int) -> np.ndarray:
    if alpha is None:
        return np.ones(channels)
    a = np.asarray(alpha, dtype=np.float64)
    if a.shape != (channels,):
        raise GdwsError(f"alpha must have shape ({channels},), got {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise GdwsError("alpha must be finite and >= 0")
    return a


def _truncate(
    spectra: ChannelSpectra,
    alpha: Optional[np.ndarray],
    keep: int,
    dropped_error: np.ndarray,
) -> GdwsFactors:
    """Factors of the first `keep` terms in keep order.

    dropped_error: cumulative weighted energy of terms dropped from the end of the keep
    order; its entry for the dropped count is the error reported, so the figure compared
    with beta and the figure returned are the same number.
    """
    total = dropped_error.size
    kept = np.sort(spectra.keep_order(alpha)[:keep])
    channels, index = np.divmod(kept, spectra.rank)
    error = float(dropped_error[total - keep - 1]) if keep < total else 0.0
    return _factors(spectra, channels, index, error)


# The kernels per channel offered to a layer under a speed goal (speed_target.py).
UNIFORM_PER_CHANNEL = (1, 2, 3, 4, 6)


def uniform(
    weight: WeightOrSpectra, per_channel: int, alpha: Optional[np.ndarray] = None
) -> GdwsFactors:
    """Every channel keeps its `per_channel` strongest kernels (all it has, if fewer).

    The form whose depthwise convs need no Gather and no zero kernels: one depthwise conv
    per kernel rank, each a plain group = C conv. alpha only weighs the error reported.
    """
    if int(per_channel) != per_channel or per_channel < 1:
        raise GdwsError(f"kernels per channel must be a whole number >= 1, got {per_channel}")
    spectra = _spectra(weight)
    keep = min(int(per_channel), spectra.rank)
    channels = np.repeat(np.arange(spectra.in_channels), keep)
    index = np.tile(np.arange(keep), spectra.in_channels)
    return _factors(spectra, channels, index, spectra.dropped_energy(keep, alpha))


def _factors(
    spectra: ChannelSpectra, channels: np.ndarray, index: np.ndarray, error: float
) -> GdwsFactors:
    """The factors of terms (channels[i], index[i]), channels sorted."""
    kh, kw = spectra.kernel_shape
    depthwise = spectra.vt[channels, index].reshape(channels.size, kh, kw)
    pointwise = (spectra.u[channels, :, index] * spectra.s[channels, index][:, None]).T
    return GdwsFactors(
        channels=channels.astype(np.int64),
        depthwise=depthwise.astype(spectra.dtype),
        pointwise=np.ascontiguousarray(pointwise).astype(spectra.dtype),
        error=error,
        in_channels=spectra.in_channels,
    )


# Whole-model MAC targets: how kernels are shared out across layers. Measured on the
# bundled robust model and a digits model by benchmarks/allocation_rules.py (README).
ALLOCATIONS: Dict[str, str] = {
    "auto": "measured when loss curves are given, else relative",
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
