"""GDWS math: per-input-channel SVD, LEGO, MEGO and a kernel budget across layers.

Pure numpy, no ONNX. A conv weight W (M, C, kh, kw) is split per input channel c
into W_c (M, k), k = kh*kw, with SVD W_c = sum_i s_ci u_ci v_ci^T. A GDWS conv keeps
some rank-1 terms: each is one depthwise kernel v_ci on channel c and one pointwise
column s_ci*u_ci. Dropping term (c, i) costs alpha_c * s_ci^2 of weighted error, so
keeping the terms of largest weighted energy is exactly optimal (Eckart-Young per
channel); LEGO and MEGO differ only in where they stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

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


def lego(
    weight: WeightOrSpectra,
    beta: float,
    alpha: Optional[np.ndarray] = None,
    min_kernels: int = 1,
) -> GdwsFactors:
    """LEGO: the fewest depthwise kernels whose weighted error stays <= beta.

    weight: (M, C, kh, kw) or its ChannelSpectra; alpha: (C,) channel weights, None for
    ones. At least `min_kernels` are kept so the layer never vanishes (the error is then
    below beta).
    """
    if not np.isfinite(beta) or beta < 0:
        raise GdwsError(f"beta must be a finite number >= 0, got {beta}")
    spectra = _spectra(weight)
    ranked = spectra.ranked_energies(alpha)
    dropped_error = np.cumsum(ranked[::-1])
    droppable = int(np.searchsorted(dropped_error, beta, side="right"))
    keep = max(ranked.size - droppable, min(min_kernels, ranked.size))
    return _truncate(spectra, alpha, keep, dropped_error)


def mego(
    weight: WeightOrSpectra,
    budget: int,
    alpha: Optional[np.ndarray] = None,
) -> GdwsFactors:
    """MEGO: the least weighted error with at most `budget` depthwise kernels.

    weight: (M, C, kh, kw) or its ChannelSpectra; alpha: (C,) channel weights, None for
    ones. Terms of zero weighted energy are never kept: they add kernels, not accuracy.
    """
    if int(budget) != budget or budget < 1:
        raise GdwsError(f"budget must be a whole number of kernels >= 1, got {budget}")
    spectra = _spectra(weight)
    ranked = spectra.ranked_energies(alpha)
    useful = max(int(np.count_nonzero(ranked > 0)), 1)
    keep = min(int(budget), useful)
    return _truncate(spectra, alpha, keep, np.cumsum(ranked[::-1]))


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
    if not target_reduction >= 1:
        raise GdwsError(f"MAC reduction must be >= 1, got {target_reduction}")
    kernel_macs = np.array([c.kernel_macs for c in costs], dtype=np.float64)
    dense_macs = np.array([c.dense_macs for c in costs], dtype=np.float64)
    sizes = np.array([e.size for e in ranked_energies])
    floor = np.minimum(min_kernels, sizes)
    budget = (fixed_macs + dense_macs.sum()) / target_reduction
    dense = floor * kernel_macs >= dense_macs
    while True:
        mandatory = fixed_macs + dense_macs[dense].sum() + (floor * kernel_macs)[~dense].sum()
        if mandatory > budget:
            best = (fixed_macs + dense_macs.sum()) / mandatory
            raise GdwsError(
                f"cannot reach {target_reduction:g}x fewer MACs: at most {best:.2f}x "
                f"with {min_kernels} kernel(s) per layer"
            )
        kept = floor + _greedy_picks(ranked_energies, kernel_macs, floor, dense, budget - mandatory)
        too_costly = ~dense & (kept * kernel_macs >= dense_macs)
        if not too_costly.any():
            return [None if d else int(k) for d, k in zip(dense, kept)]
        dense |= too_costly


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
    kh, kw = spectra.kernel_shape
    depthwise = spectra.vt[channels, index].reshape(keep, kh, kw)
    pointwise = (spectra.u[channels, :, index] * spectra.s[channels, index][:, None]).T
    error = float(dropped_error[total - keep - 1]) if keep < total else 0.0
    return GdwsFactors(
        channels=channels.astype(np.int64),
        depthwise=depthwise.astype(spectra.dtype),
        pointwise=np.ascontiguousarray(pointwise).astype(spectra.dtype),
        error=error,
        in_channels=spectra.in_channels,
    )
