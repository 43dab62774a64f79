"""ATMC's post-training compression (Gui et al., NeurIPS 2019), the math: numpy only.

A Conv weight W (M, C, kh, kw) is read as its filter bank, the matrix (M, K = C*kh*kw).
Its SVD cut to rank r gives W ~ U V: V (r, K) is a kh x kw Conv of r filters and U
(M, r) a 1x1 Conv to the M outputs, two dense Convs any engine runs, r (K + M) MACs per
output pixel against M K. The singular values are split evenly (their square roots on
each side) so that both factors have alike ranges for weight sharing.

ATMC's other two parts, each optional:
- a sparse residual C: the largest entries of W - U V under one non-zero budget shared
  by all factored layers (by magnitude, across the model). It is written as a second
  branch, the original Conv with the sparse weight, added: dense engines (onnxruntime,
  TensorRT 8.5 on Xavier) compute it in full, so it saves model size, not time.
- k-means weight sharing: U, V and C's non-zeros each take at most 2^b values per layer
  (Lloyd's algorithm in 1-D). The weights stay floats in the ONNX graph: the saving is
  in the size ATMC counts (non-zeros x b bits), not in what the graph stores.

Order, so each later part mends the earlier ones' error: the factors are shared first,
the residual is taken from W - U_q V_q, then its own non-zeros are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

# Lloyd iterations at most; 1-D k-means settles in far fewer on weight distributions.
LLOYD_ITERATIONS = 100

# Singular values below this share of the largest are rounding noise (spectrum).
SILENT = 1e-7
# A filter bank's SVD: U (M, f), singular values (f,), V^T (f, K), f = min(M, K).
Svd = Tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class AtmcFactors:
    """One layer's ATMC form.

    first: (r, C, kh, kw) the kh x kw Conv's weight (V); second: (M, r, 1, 1) the 1x1
    Conv's weight (U); residual: (M, C, kh, kw) the sparse branch's weight, or None
    without one; bits: the shared values' bits (None: plain floats); error: the squared
    reconstruction error ||W - (U V + C)||_F^2.
    """

    first: np.ndarray
    second: np.ndarray
    residual: Optional[np.ndarray]
    bits: Optional[int]
    error: float

    @property
    def rank(self) -> int:
        return self.first.shape[0]

    def dense(self) -> np.ndarray:
        """The (M, C, kh, kw) weight the form computes, as one dense Conv."""
        low = self.second[:, :, 0, 0].astype(np.float64) @ self.first.reshape(self.rank, -1)
        low = low.reshape(self.second.shape[0], *self.first.shape[1:])
        return low if self.residual is None else low + self.residual


def max_rank(weight_shape: Sequence[int]) -> int:
    """The largest rank whose factored form has fewer MACs than the dense Conv: r with
    r (K + M) < M K (0 when even rank 1 does not)."""
    out_channels, in_channels, kh, kw = weight_shape
    columns = in_channels * kh * kw
    return math.ceil(out_channels * columns / (out_channels + columns)) - 1


def rank_macs(weight_shape: Sequence[int], pixels: int) -> int:
    """MACs one rank of the factored form costs at batch 1: a kh x kw filter and a 1x1
    column at every output pixel."""
    out_channels, in_channels, kh, kw = weight_shape
    return (in_channels * kh * kw + out_channels) * pixels


def spectrum(weight: np.ndarray) -> Svd:
    """The SVD of the filter bank (M, C*kh*kw), in float64, from the eigenvectors of its
    smaller Gram matrix: ten times faster than LAPACK's SVD on VGG-16's (512, 4608) banks.

    Singular values far below the largest lose relative accuracy that way, which does not
    reach the factors: at any rank they compute W projected on orthonormal directions
    (U U^T W, or W V V^T), so full rank stays exact. Directions whose singular value is
    below SILENT of the largest (rounding noise of the Gram matrix) get zero factors
    instead of the 1/sigma that would blow them up.
    """
    bank = weight.reshape(weight.shape[0], -1).astype(np.float64)
    tall = bank.shape[0] > bank.shape[1]
    energy, vectors = np.linalg.eigh(bank.T @ bank if tall else bank @ bank.T)
    singular = np.sqrt(np.clip(energy[::-1], 0.0, None))
    vectors = vectors[:, ::-1]
    heard = singular > SILENT * singular[0]
    inverse = np.divide(1.0, singular, out=np.zeros_like(singular), where=heard)
    singular = np.where(heard, singular, 0.0)
    if tall:
        return (bank @ vectors) * inverse, singular, vectors.T
    return vectors, singular, (vectors.T @ bank) * inverse[:, None]


def low_rank(svd: Svd, rank: int, weight_shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The rank-`rank` factors as Conv weights, float64: (r, C, kh, kw) and (M, r, 1, 1),
    the singular values split evenly between them."""
    u, s, vt = svd
    root = np.sqrt(s[:rank])
    first = (root[:, None] * vt[:rank]).reshape(rank, *weight_shape[1:])
    second = (u[:, :rank] * root)[:, :, None, None]
    return first, second


def share_weights(values: np.ndarray, bits: int) -> np.ndarray:
    """`values` with each replaced by its cluster's mean, at most 2^bits clusters: 1-D
    k-means (Lloyd), started from centroids spread evenly over the range (the linear
    start Deep Compression found best for weights). Values already taking at most 2^bits
    levels come back unchanged."""
    flat = values.reshape(-1).astype(np.float64)
    levels = 2**bits
    if np.unique(flat).size <= levels:
        return values.copy()
    centroids = np.linspace(flat.min(), flat.max(), levels)
    assigned = None
    for _ in range(LLOYD_ITERATIONS):
        cluster = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
        if assigned is not None and np.array_equal(cluster, assigned):
            break
        assigned = cluster
        counts = np.bincount(cluster, minlength=levels)
        sums = np.bincount(cluster, weights=flat, minlength=levels)
        centroids = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
    cluster = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    return centroids[cluster].reshape(values.shape)


def sparse_residuals(residuals: Sequence[np.ndarray], sparsity: float) -> List[np.ndarray]:
    """Each residual with only the entries of the largest magnitudes kept, round(sparsity
    x all entries) of them across all residuals together (ATMC's global budget)."""
    sizes = np.array([r.size for r in residuals])
    magnitude = np.concatenate([np.abs(r).reshape(-1) for r in residuals])
    budget = round(sparsity * magnitude.size)
    keep = np.zeros(magnitude.size, dtype=bool)
    if budget:
        keep[np.argpartition(-magnitude, budget - 1)[:budget]] = True
    masks = np.split(keep, np.cumsum(sizes)[:-1])
    return [np.where(m.reshape(r.shape), r, 0.0) for m, r in zip(masks, residuals)]


def factorize(
    weights: Sequence[np.ndarray],
    svds: Sequence[Svd],
    ranks: Sequence[int],
    sparsity: Optional[float] = None,
    bits: Optional[int] = None,
) -> List[AtmcFactors]:
    """Each layer's ATMC form at its rank: factors shared to 2^bits values (with bits),
    plus a sparse residual under the global budget `sparsity` (with a sparsity > 0);
    weights in each layer's own float type."""
    factored = [low_rank(svd, rank, w.shape) for w, svd, rank in zip(weights, svds, ranks)]
    if bits is not None:
        factored = [(share_weights(v, bits), share_weights(u, bits)) for v, u in factored]
    residuals: List[Optional[np.ndarray]] = [None] * len(weights)
    if sparsity:
        errors = [
            w.astype(np.float64) - AtmcFactors(v, u, None, None, 0.0).dense()
            for w, (v, u) in zip(weights, factored)
        ]
        residuals = [_shared_nonzeros(c, bits) for c in sparse_residuals(errors, sparsity)]
    forms = []
    for weight, (first, second), residual in zip(weights, factored, residuals):
        kind = weight.dtype
        cast = None if residual is None or not residual.any() else residual.astype(kind)
        form = AtmcFactors(first.astype(kind), second.astype(kind), cast, bits, 0.0)
        error = float(((weight.astype(np.float64) - form.dense()) ** 2).sum())
        forms.append(AtmcFactors(form.first, form.second, form.residual, bits, error))
    return forms


def _shared_nonzeros(residual: np.ndarray, bits: Optional[int]) -> np.ndarray:
    """The residual with its non-zeros shared to 2^bits values (unchanged without bits)."""
    nonzero = residual != 0
    if bits is None or not nonzero.any():
        return residual
    shared = residual.copy()
    shared[nonzero] = share_weights(residual[nonzero], bits)
    return shared
