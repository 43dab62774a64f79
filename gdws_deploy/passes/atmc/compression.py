"""ATMC's post-training part as a CompressionPass: which Convs it takes, the rank of
each (a rank share, or a whole-model MAC target shared out), the written form.

A Conv ATMC can take is one GKP can: 2-D, ungrouped, with a constant float weight. A
layer is factored only where its rank costs fewer MACs than the dense Conv. A sparse
residual (sparsity) adds the original Conv with a sparse weight as a second branch, which
dense engines compute in full: the report's MACs count it so, and it saves model size
(non-zeros x bits), not time. Beta, budget, alphas, loss curves and the GDWS allocation
rules are GDWS's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence

import numpy as np
import onnx

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer
from gdws_deploy.passes.atmc.allocation import allocate_ranks
from gdws_deploy.passes.atmc.factors import factorize, max_rank, rank_macs, spectrum
from gdws_deploy.passes.atmc.rewrite import rewrite
from gdws_deploy.passes.base import (
    CompressionPass,
    LayerOption,
    Progress,
    Stage,
    chosen_factors,
    without_gdws_settings,
)
from gdws_deploy.passes.gkp.compression import GkpPass

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

# How a MAC target is shared out (ConvertReport.allocation): see allocate_ranks.
ALLOCATION = "relative"
# The written forms (the report's lowering column): factors alone, or with the residual.
LOW_RANK, WITH_RESIDUAL = "low-rank", "low-rank+sparse"
# Bits k-means weight sharing takes (2 to 65536 shared values).
MAX_BITS = 16


class AtmcPass(CompressionPass):
    """ATMC (Gui et al., NeurIPS 2019), post-training: low-rank filter banks, an optional
    sparse residual, optional k-means weight sharing."""

    name = "atmc"
    label = "ATMC"
    structural = ("grouped conv",)
    nothing_to_do = "all Convs are depthwise or grouped: nothing for ATMC to factor"
    why_not = GkpPass.why_not  # the same Convs: 2-D, ungrouped, constant float weight

    def cannot_shrink(self, layer: ConvLayer) -> Optional[str]:
        if max_rank(layer.weight_shape) < 1:
            return "even rank 1 costs no fewer MACs than the dense conv"
        return None

    def prepare(
        self,
        analyzed: AnalyzedModel,
        options: ConvertOptions,
        *,
        progress: Optional[Progress] = None,
        stage: Optional[Stage] = None,
    ) -> ConvertOptions:
        """GdwsError for what only GDWS takes and for ATMC settings out of range; the
        allocation named as ATMC's."""
        check_settings(options)
        return without_gdws_settings(
            options,
            "atmc",
            "a MAC reduction or a rank share",
            ALLOCATION,
            "relative singular-value energy per MAC",
        )

    def plan(
        self, analyzed: AnalyzedModel, layers: Sequence[ConvLayer], options: ConvertOptions
    ) -> Dict[int, LayerOption]:
        """Each layer's rank (ceil(rank_share x full rank), or allocate_ranks for the MAC
        target), then the factors of the layers a rank makes cheaper, sparse residual and
        weight sharing included."""
        layers = [layer for layer in layers if self.cannot_shrink(layer) is None]
        if not layers or (options.mac_reduction is None and options.rank_share is None):
            return {}
        svds = [spectrum(layer.weight) for layer in layers]
        top = np.array([max_rank(layer.weight_shape) for layer in layers])
        price = np.array([rank_macs(layer.weight_shape, layer.pixels) for layer in layers])
        if options.rank_share is not None:
            wanted = np.array([_share_of(options.rank_share, svd[1].size) for svd in svds])
            ranks = np.where(wanted <= top, wanted, 0)
        else:
            ranks = allocate_ranks(
                [svd[1] for svd in svds],
                top,
                np.array([layer.macs for layer in layers]),
                price,
                analyzed.total_macs,
                options.mac_reduction,
            )
        kept = np.flatnonzero(ranks > 0)
        if not kept.size:
            return {}
        forms = factorize(
            [layers[i].weight for i in kept],
            [svds[i] for i in kept],
            [int(ranks[i]) for i in kept],
            options.sparsity,
            options.bits,
        )
        planned = {}
        for i, factors in zip(kept, forms):
            layer = layers[i]
            macs = int(ranks[i] * price[i])
            form = LOW_RANK if factors.residual is None else WITH_RESIDUAL
            if factors.residual is not None:
                macs += layer.macs
            planned[layer.index] = LayerOption(factors, macs, factors.error, factors.rank, form)
        return planned

    def write(self, analyzed: AnalyzedModel, chosen: Mapping[int, LayerOption]) -> onnx.ModelProto:
        """The model itself when no layer is factored."""
        factored = chosen_factors(analyzed, chosen)
        return rewrite(analyzed.model, factored) if factored else analyzed.model


def check_settings(options: ConvertOptions) -> None:
    """GdwsError, one line, for a rank share, sparsity or bits out of range."""
    share, sparsity, bits = options.rank_share, options.sparsity, options.bits
    if share is not None and not (np.isfinite(share) and 0 < share <= 1):
        raise GdwsError(f"rank share must be a number in (0, 1], got {share}")
    if sparsity is not None and not (np.isfinite(sparsity) and 0 <= sparsity <= 1):
        raise GdwsError(f"sparsity must be a share in [0, 1], got {sparsity}")
    if bits is not None and (int(bits) != bits or not 1 <= bits <= MAX_BITS):
        raise GdwsError(f"bits must be a whole number from 1 to {MAX_BITS}, got {bits}")


def _share_of(share: float, full: int) -> int:
    """ceil(share x full), the product rounded first so 0.1 x 30 is 3, not 4."""
    return max(1, math.ceil(round(share * full, 9)))
