"""GDWS as a CompressionPass: which Convs it takes, their factors for a target, the rewrite.

A Conv GDWS can take is a 2-D, ungrouped conv with a kernel larger than 1x1 and a float
weight. prepare() checks the alphas and the allocation rule and runs the one batched SVD
per layer (kept in the options' SpectraCache for every plan that follows); plan() is
LEGO (beta), MEGO (budget) or a whole-model allocation (mac_reduction); write() lowers
each layer's factors in its chosen form (passes/gdws/lowering.py).
"""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer
from gdws_deploy.passes.base import FLOAT_WEIGHTS, CompressionPass, LayerOption, Progress, Stage
from gdws_deploy.passes.gdws.allocation import (
    USES_ALPHAS,
    LayerCost,
    LossCurve,
    allocate,
    resolve_allocation,
)
from gdws_deploy.passes.gdws.decompose import ChannelSpectra, GdwsFactors, SpectraCache, lego, mego
from gdws_deploy.passes.gdws.lowering import ALIGNED_LOWERINGS, LOWERINGS, PerLayer
from gdws_deploy.passes.gdws.rewrite import rewrite

if TYPE_CHECKING:
    from gdws_deploy.options import AlphaSource, ConvertOptions

# Why an eligible layer stayed dense when even one kernel costs as the dense conv.
NO_GAIN = "GDWS form would not reduce its MACs"


class GdwsPass(CompressionPass):
    """Generalized depthwise-separable factors of KxK convs (the paper's LEGO and MEGO)."""

    name = "gdws"
    label = "GDWS"
    structural = ("grouped conv", "1x1 kernel")
    nothing_to_do = "all Convs are depthwise, grouped or 1x1: nothing for GDWS to do"
    calibrates = True

    def why_not(self, layer: ConvLayer) -> Optional[str]:
        if len(layer.weight_shape) != 4:
            return f"not a 2-D conv (weight rank {len(layer.weight_shape)})"
        if layer.group != 1:
            return f"grouped conv (group={layer.group})"
        if layer.weight_shape[2:] == (1, 1):
            return "1x1 kernel (already pointwise)"
        if layer.weight_type not in FLOAT_WEIGHTS:
            kind = TensorProto.DataType.Name(layer.weight_type).lower()
            return f"weight type {kind} is not a float type"
        return None

    def cannot_shrink(self, layer: ConvLayer) -> Optional[str]:
        return NO_GAIN if layer.kernel_macs >= layer.macs else None

    def prepare(
        self,
        analyzed: AnalyzedModel,
        options: ConvertOptions,
        *,
        progress: Optional[Progress] = None,
        stage: Optional[Stage] = None,
    ) -> ConvertOptions:
        """Alphas read and checked per eligible layer, the allocation rule resolved (for a
        MAC or speed target), and every eligible layer's SVD in the options' cache."""
        layers = analyzed.eligible
        alphas = _alphas(options.alphas, layers)
        changes: Dict[str, object] = {"alphas": alphas or None}
        if options.mac_reduction is not None or options.has_speed_goal:
            changes["allocation"] = _rule(
                options.allocation, alphas, options.loss_curves, options.has_speed_goal
            )
        cache = options.spectra_cache if options.spectra_cache is not None else SpectraCache()
        if stage is not None:
            stage(f"factoring {len(layers)} Conv(s)")
        for done, layer in enumerate(layers, start=1):
            cache.get(layer.name, layer.weight)
            if progress is not None:
                progress(done, len(layers), layer.name)
        return replace(options, spectra_cache=cache, **changes)

    def spectra(
        self, layers: Sequence[ConvLayer], options: ConvertOptions
    ) -> Dict[str, ChannelSpectra]:
        """Each layer's per-channel SVD by name, from the cache prepare() filled."""
        return {layer.name: options.spectra_cache.get(layer.name, layer.weight) for layer in layers}

    def plan(
        self, analyzed: AnalyzedModel, layers: Sequence[ConvLayer], options: ConvertOptions
    ) -> Dict[int, LayerOption]:
        if not layers:
            return {}
        spectra = list(self.spectra(layers, options).values())
        weights = options.alphas or {}
        alpha = [weights.get(layer.name) for layer in layers]
        if options.mac_reduction is not None:
            costs = [LayerCost(layer.kernel_macs, layer.macs) for layer in layers]
            fixed = analyzed.total_macs - sum(cost.dense_macs for cost in costs)
            rule = options.allocation
            curves = layer_curves(options.loss_curves, layers) if rule == "measured" else None
            factors = allocate(rule, spectra, costs, fixed, options.mac_reduction, alpha, curves)
        elif options.beta is not None:
            factors = [lego(s, options.beta, a) for s, a in zip(spectra, alpha)]
        else:
            factors = [mego(s, options.budget, a) for s, a in zip(spectra, alpha)]
        chosen = [(layer, option(layer, f)) for layer, f in zip(layers, factors) if f is not None]
        return {layer.index: gdws for layer, gdws in chosen if gdws.macs < layer.macs}

    def write(
        self, analyzed: AnalyzedModel, chosen: Mapping[int, LayerOption], aligned: bool = False
    ) -> onnx.ModelProto:
        """aligned: in the forms tuning measures (lowering.ALIGNED_LOWERINGS). The model
        itself when every layer stays dense."""
        rewritten = [
            (layer, chosen[layer.index])
            for layer in analyzed.convs
            if layer.index in chosen and chosen[layer.index].form != "dense"
        ]
        if not rewritten:
            return analyzed.model
        lowering = PerLayer(
            {layer.name: option.form for layer, option in rewritten},
            ALIGNED_LOWERINGS if aligned else LOWERINGS,
        )
        factors = [(layer, option.factors) for layer, option in rewritten]
        return rewrite(analyzed.model, factors, analyzed.types, lowering)


def option(layer: ConvLayer, factors: GdwsFactors, form: str = "") -> LayerOption:
    """The LayerOption of `factors` for `layer`: its kernels' MACs and error."""
    macs = factors.kernels * layer.kernel_macs
    return LayerOption(factors, macs, factors.error, factors.kernels, form)


def layer_curves(
    curves: Optional[Mapping[str, LossCurve]], layers: Sequence[ConvLayer]
) -> List[LossCurve]:
    """The measured loss curve of each layer; GdwsError naming the first without one."""
    missing = [layer.name for layer in layers if layer.name not in (curves or {})]
    if missing:
        raise GdwsError(f"no measured loss curve for Conv {missing[0]!r}")
    return [curves[layer.name] for layer in layers]


def _alphas(source: AlphaSource, layers: Sequence[ConvLayer]) -> Dict[str, np.ndarray]:
    """Channel weights per eligible layer name; {} without alphas (all ones).

    Keys starting with "__" hold settings of whoever computed them and are ignored.
    """
    if source is None:
        return {}
    table = _read_npz(source) if isinstance(source, (str, Path)) else dict(source)
    weights = {}
    for layer in layers:
        if layer.name not in table:
            raise GdwsError(f"alphas have no entry for Conv {layer.name!r}")
        alpha = np.asarray(table[layer.name], dtype=np.float64)
        channels = layer.weight_shape[1]
        if alpha.shape != (channels,):
            raise GdwsError(
                f"alphas for {layer.name!r} have shape {alpha.shape}, expected ({channels},)"
            )
        weights[layer.name] = alpha
    return weights


def _read_npz(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise GdwsError(f"cannot read alphas from {path}: no such file")
    if not zipfile.is_zipfile(path):  # np.load would try it as .npy, then as a pickle
        raise GdwsError(f"cannot read alphas from {path}: not an npz archive (numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files if not key.startswith("__")}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise GdwsError(f"cannot read alphas from {path}: {error}") from error


def _rule(
    allocation: str,
    alphas: Mapping[str, np.ndarray],
    curves: Optional[Mapping[str, LossCurve]],
    speed_goal: bool,
) -> str:
    """The allocation rule a MAC-reduction target runs; alphas it would ignore are an error."""
    rule = resolve_allocation(allocation, curves is not None, speed_goal)
    if alphas and rule not in USES_ALPHAS:
        raise GdwsError(
            f"allocation {rule!r} does not use alphas; give allocation "
            f"{' or '.join(USES_ALPHAS)} with them, or leave them out"
        )
    return rule
