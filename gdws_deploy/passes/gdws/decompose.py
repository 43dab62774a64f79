"""GDWS math for one layer: per-input-channel SVD, then LEGO, MEGO or uniform factors.

Pure numpy, no ONNX. A conv weight W (M, C, kh, kw) is split per input channel c
into W_c (M, k), k = kh*kw, with SVD W_c = sum_i s_ci u_ci v_ci^T. A GDWS conv keeps
some rank-1 terms: each is one depthwise kernel v_ci on channel c and one pointwise
column s_ci*u_ci. Dropping term (c, i) costs alpha_c * s_ci^2 of weighted error, so
keeping the terms of largest weighted energy is exactly optimal (Eckart-Young per
channel); LEGO and MEGO differ only in where they stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

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


# The kernels per channel offered to a layer under a speed goal (speed/goals.py).
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
