"""Grouped kernel pruning as a CompressionPass: which Convs it takes, how a MAC target is
shared out across them, the grouped rewrite.

A Conv GKP can take is a 2-D, ungrouped conv with a constant float weight, 1x1 included.
It takes a whole-model MAC target only (mac_reduction): beta, budget, alphas, loss curves
and the GDWS allocation rules are GDWS's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer
from gdws_deploy.passes.base import (
    FLOAT_WEIGHTS,
    CompressionPass,
    LayerOption,
    Progress,
    Stage,
    chosen_factors,
    without_gdws_settings,
)
from gdws_deploy.passes.gdws.allocation import UnreachableTargetError
from gdws_deploy.passes.gkp.kernels import cut_energy, prune_layer
from gdws_deploy.passes.gkp.rewrite import rewrite

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

# The form a pruned layer is written in (the report's lowering column).
FORM = "grouped"
# How a MAC target is shared out (ConvertReport.allocation): see allocate_keep.
ALLOCATION = "relative"


class GkpPass(CompressionPass):
    """Grouped kernel pruning (Zhong et al., NeurIPS 2023): one-shot, data-free."""

    name = "gkp"
    label = "GKP"
    structural = ("grouped conv",)
    nothing_to_do = "all Convs are depthwise or grouped: nothing for GKP to prune"

    def why_not(self, layer: ConvLayer) -> Optional[str]:
        if len(layer.weight_shape) != 4:
            return f"not a 2-D conv (weight rank {len(layer.weight_shape)})"
        if layer.group != 1:
            return f"grouped conv (group={layer.group})"
        if layer.weight_type not in FLOAT_WEIGHTS:
            kind = TensorProto.DataType.Name(layer.weight_type).lower()
            return f"weight type {kind} is not a float type"
        return None

    def cannot_shrink(self, layer: ConvLayer) -> Optional[str]:
        return "one input channel: no kernel to prune" if layer.weight_shape[1] < 2 else None

    def prepare(
        self,
        analyzed: AnalyzedModel,
        options: ConvertOptions,
        *,
        progress: Optional[Progress] = None,
        stage: Optional[Stage] = None,
    ) -> ConvertOptions:
        """GdwsError for what only GDWS takes; the allocation named as GKP's."""
        return without_gdws_settings(
            options, "gkp", "a MAC reduction only", ALLOCATION, "relative pruned energy per MAC"
        )

    def plan(
        self, analyzed: AnalyzedModel, layers: Sequence[ConvLayer], options: ConvertOptions
    ) -> Dict[int, LayerOption]:
        """Kernels kept per filter group of each layer for the MAC target (allocate_keep),
        then each pruned layer's beam search."""
        layers = [layer for layer in layers if self.cannot_shrink(layer) is None]
        if not layers or options.mac_reduction is None:
            return {}
        dense = np.array([layer.macs for layer in layers], dtype=np.float64)
        keep = allocate_keep(
            [cut_energy(layer.weight) for layer in layers],
            dense,
            analyzed.total_macs,
            options.mac_reduction,
        )
        planned = {}
        for layer, kept in zip(layers, keep):
            channels = layer.weight_shape[1]
            if kept < channels:
                factors = prune_layer(layer.weight, int(kept))
                macs = layer.macs // channels * int(kept)
                planned[layer.index] = LayerOption(factors, macs, factors.error, int(kept), FORM)
        return planned

    def write(self, analyzed: AnalyzedModel, chosen: Mapping[int, LayerOption]) -> onnx.ModelProto:
        """The model itself when no layer is pruned."""
        pruned = chosen_factors(analyzed, chosen)
        return rewrite(analyzed.model, pruned) if pruned else analyzed.model


def allocate_keep(
    cut: Sequence[np.ndarray], dense_macs: np.ndarray, total_macs: float, reduction: float
) -> np.ndarray:
    """Kernels each filter group of each layer keeps so that the model has at most
    total_macs / reduction MACs, at least one kernel per group.

    cut[l]: (C_l,) layer l's energy share lost with j = 0..C_l-1 kernels pruned per group
    (kernels.cut_energy); dense_macs: (L,) the layers' MACs, 1/C_l of which each pruned
    kernel per group saves.

    Why not the paper's one pruning share for every layer: a layer's MACs move in steps of
    1/C of them, so one share lands a model-wide target only by luck (on the bundled model
    by up to a step of 2 %), and it prunes layers whose kernels carry much of their layer's
    energy as deep as those whose kernels carry little. Instead, kernels are pruned
    greedily by energy share lost per MAC saved (what GDWS's 'relative' rule does with
    singular values): the share is scale-free across layers and convex in the depth, so
    the greedy order is optimal for it; the last step is the smallest single step that
    reaches the target, so the target is overshot by at most that step. The share is that
    of each group's least energetic kernels, a lower bound of what the beam search (which
    chooses by similarity and smoothness) then prunes.
    """
    sizes = np.array([c.size for c in cut])
    price = np.asarray(dense_macs, dtype=np.float64) / sizes
    need = total_macs - total_macs / reduction
    if need <= 0:
        return sizes.copy()
    owner = np.repeat(np.arange(sizes.size), sizes - 1)
    depth = np.concatenate([np.arange(1, s) for s in sizes])
    step = np.concatenate([np.diff(c) for c in cut])
    order = np.lexsort((depth, step / price[owner]))
    saved = np.cumsum(price[owner[order]])
    last = int(np.searchsorted(saved, need))
    if last == saved.size:
        best = total_macs / (total_macs - saved[-1]) if saved.size else 1.0
        raise UnreachableTargetError(
            f"cannot reach {reduction:g}x fewer MACs: at most {best:.2f}x with one kernel "
            "per filter group"
        )
    pruned = np.bincount(owner[order[:last]], minlength=sizes.size)
    short = need - (saved[last - 1] if last else 0.0)
    return sizes - pruned - _closing(pruned, sizes, price, short, step / price[owner])


def _closing(
    pruned: np.ndarray, sizes: np.ndarray, price: np.ndarray, short: float, ratio: np.ndarray
) -> np.ndarray:
    """Steps per layer that save the last `short` MACs with the least overshoot: one
    step (the cheapest price that covers it; among equals, the best ratio) or, when that
    overshoots more, steps of the layers with the smallest prices (each until it covers)."""
    room = sizes - 1 - pruned
    first = np.cumsum(sizes - 1) - (sizes - 1)  # each layer's first step in `ratio`
    following = ratio[np.minimum(first + pruned, ratio.size - 1)]
    covers = (room > 0) & (price >= short)
    one = np.zeros_like(pruned)
    one[np.lexsort((following, price, ~covers))[0]] = 1
    by_price = np.argsort(np.where(room > 0, price, np.inf), kind="stable")
    capacity = np.cumsum((room * price)[by_price])
    filled = min(int(np.searchsorted(capacity, short)), by_price.size - 1)
    fill = np.zeros_like(pruned)
    fill[by_price[:filled]] = room[by_price[:filled]]
    rest = short - (capacity[filled - 1] if filled else 0.0)
    fill[by_price[filled]] = min(
        room[by_price[filled]], int(np.ceil(rest / price[by_price[filled]]))
    )
    if (fill * price).sum() < (one * price).sum() and (fill * price).sum() >= short:
        return fill
    return one
