"""Measured sensitivity: how much robust loss each layer's GDWS cut costs, on real data.

The error measures of the GDWS math (s^2, alpha-weighted s^2) do not share one scale
across layers, so a whole-model allocation by them misjudges which layer can give up
kernels (benchmarks/allocation_rules.py). This module measures it instead: the original
is attacked once on calibration data; then, one layer at a time, the layer's weight is
replaced by its GDWS form at a grid of kernel counts and the cross-entropy on those fixed
adversarial inputs is measured again. The increases form one LossCurve per layer, which
gdws.allocate("measured") turns into kernels. Forward passes only: a grid of counts
times the layers, no attack per count.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir import graph as onnx_graph
from gdws_deploy.ir.analyze import AnalyzedModel, analyze
from gdws_deploy.passes.gdws.allocation import USES_ALPHAS, LossCurve, resolve_allocation
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.passes.gdws.decompose import (
    UNIFORM_PER_CHANNEL,
    ChannelSpectra,
    SpectraCache,
    mego,
    uniform,
)
from gdws_deploy.robustness.attacks import with_normalization
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.device import resolve_device
from gdws_deploy.robustness.mirror import OnnxMirror
from gdws_deploy.robustness.transfer import crafted

if TYPE_CHECKING:  # the pipeline's options pass through; robustness does not build them
    from gdws_deploy.options import ConvertOptions

# Kernel counts measured per layer, in multiples of its input channels C (G = C is the
# depthwise-separable point); 0 (the layer zeroed) is always measured too.
DEFAULT_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# progress(layers done, layers total)
Progress = Callable[[int, int], None]


def measure_loss_curves(
    model: Union[str, Path, onnx_graph.LoadedModel, AnalyzedModel],
    check: RobustnessCheck,
    spectra: Optional[SpectraCache] = None,
    grid: Sequence[float] = DEFAULT_GRID,
    progress: Optional[Progress] = None,
    all_layers: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    per_channel: bool = False,
) -> Dict[str, LossCurve]:
    """A LossCurve per Conv that convert() with the same layer selection would rewrite
    (an analyzed model's selection stands: all_layers, include, exclude are for the others).

    Counts above the point where the GDWS form would cost as many MACs as the dense conv
    are not measured: no allocation buys them. `spectra` is filled and reused.
    per_channel: the curves of a speed goal's options instead: at counts m*C, m of
    gdws.UNIFORM_PER_CHANNEL, the layer cut to m kernels on every channel (gdws.uniform).
    """
    analyzed = _analyzed(model, all_layers=all_layers, include=include, exclude=exclude)
    layers = analyzed.eligible
    if not layers:
        raise GdwsError("the model has no Conv that GDWS can rewrite")
    spectra = spectra if spectra is not None else SpectraCache()
    device = resolve_device(check.device)
    mirror = OnnxMirror(analyzed.model).eval()
    target = with_normalization(mirror, check.mean, check.std, check.dataset.x.shape[1])
    target = target.to(device)
    x, y = _attacked(target, mirror, check, device)
    baseline = _loss(target, x, y, check.batch_size)
    curves = {}
    for done, layer in enumerate(layers, start=1):
        weight = mirror.tensor(analyzed.model.graph.node[layer.index].input[1])
        layer_spectra = spectra.get(layer.name, layer.weight)
        counts = _counts(layer, layer_spectra, UNIFORM_PER_CHANNEL if per_channel else grid)
        losses = []
        original = weight.detach().clone()
        try:
            for count in counts:
                cut = _cut_weight(layer_spectra, int(count), original, per_channel)
                with torch.no_grad():
                    weight.copy_(cut)
                losses.append(_loss(target, x, y, check.batch_size) - baseline)
        finally:
            with torch.no_grad():
                weight.copy_(original)
        curves[layer.name] = LossCurve(counts, np.array(losses))
        if progress is not None:
            progress(done, len(layers))
    return curves


def calibrate(
    model: Union[str, Path, onnx_graph.LoadedModel, AnalyzedModel],
    check: RobustnessCheck,
    options: ConvertOptions,
    *,
    by_beta: bool = False,
) -> ConvertOptions:
    """`options` made ready for a calibrated conversion: what its rule needs, measured once
    on `check` and reused for every target that follows.

    Fills in what `options` lacks: one SpectraCache; loss curves for the measured rule
    (what "auto" becomes with data), of the layers options.selection picks and, under a
    speed goal, per channel (see measure_loss_curves); alphas for the alpha and lego rules
    and for LEGO betas (by_beta: the paper's way), computed with the check's first attack.
    What options already hold is kept, so calibrating calibrated options measures nothing.
    The model is analyzed once for both, unless it comes analyzed (with options.selection).
    """
    from gdws_deploy.robustness.alphas import compute_alphas

    cache = options.spectra_cache if options.spectra_cache is not None else SpectraCache()
    changes: Dict[str, Any] = {"spectra_cache": cache}
    speed_goal = options.has_speed_goal
    rule = resolve_allocation(options.allocation, has_curves=True, speed_goal=speed_goal)
    wants_curves = not by_beta and rule == "measured" and options.loss_curves is None
    wants_alphas = options.alphas is None and (by_beta or rule in USES_ALPHAS)
    if wants_curves or wants_alphas:
        model = _analyzed(model, **options.selection)
    if wants_curves:
        changes["loss_curves"] = measure_loss_curves(model, check, cache, per_channel=speed_goal)
    if wants_alphas:
        changes["alphas"] = compute_alphas(
            model,
            check.dataset,
            check.attacks[0],
            batch_size=min(check.batch_size, 32),  # memory grows with classes x activations
            mean=check.mean,
            std=check.std,
            seed=check.seed,
            device=check.device,
        ).alphas
    return replace(options, **changes)


def _analyzed(
    model: Union[str, Path, onnx_graph.LoadedModel, AnalyzedModel], **selection: Any
) -> AnalyzedModel:
    """The model analyzed with `selection` and GDWS's layers picked; an analyzed model is
    not analyzed again."""
    if not isinstance(model, AnalyzedModel):
        loaded = (
            model if isinstance(model, onnx_graph.LoadedModel) else onnx_graph.load_model(model)
        )
        model = analyze(loaded, **selection)
    return GdwsPass().select(model)


def refuse_multi_exit(outputs: int) -> None:
    """Calibrating on data attacks a model with one output: a multi-exit model (several)
    is refused, naming what to do instead."""
    if outputs != 1:
        raise GdwsError(
            f"calibrating on data attacks a model with one output, this one has {outputs}: "
            "convert a multi-exit model with a target alone, then `gdws-deploy exits calibrate`"
        )


def _classes(logits: Any) -> int:
    """The class count of the model's one output; a multi-exit model (several) is refused."""
    if isinstance(logits, (tuple, list)):
        refuse_multi_exit(len(logits))
    return int(logits.shape[1])


def _attacked(
    target: Callable[[torch.Tensor], torch.Tensor],
    mirror: OnnxMirror,
    check: RobustnessCheck,
    device: torch.device,
):
    """The check's samples after its attacks on the original, and their labels, on
    `device`."""
    with torch.no_grad():
        check.dataset.check_model(
            mirror.input_shapes[0],
            lambda sample: _classes(target(torch.from_numpy(sample).to(device))),
        )
    x = crafted(target, check.dataset, check.attacks, check.batch_size, check.seed, device)
    return x, torch.from_numpy(check.dataset.y).to(device)


def _loss(
    target: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int
) -> float:
    """Mean cross-entropy of `target` on (x, y), in batches."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(y), batch):
            logits = target(x[start : start + batch])
            total += float(F.cross_entropy(logits, y[start : start + batch], reduction="sum"))
    return total / len(y)


def _counts(layer: onnx_graph.ConvLayer, spectra: ChannelSpectra, grid: Sequence[float]):
    """0 and the grid's kernel counts that are below every term and cheaper than dense."""
    counts = np.rint(np.asarray(grid, dtype=np.float64) * spectra.in_channels).astype(np.int64)
    useful = (counts >= 1) & (counts < spectra.s.size) & (counts * layer.kernel_macs < layer.macs)
    return np.unique(np.concatenate(([0], counts[useful])))


def _cut_weight(
    spectra: ChannelSpectra, count: int, like: torch.Tensor, per_channel: bool
) -> torch.Tensor:
    """The dense weight of the layer's GDWS form with `count` kernels (0: all zero), the
    same number on every channel when `per_channel`."""
    if count == 0:
        return torch.zeros_like(like)
    if per_channel:
        factors = uniform(spectra, count // spectra.in_channels)
    else:
        factors = mego(spectra, count)
    dense = factors.to_dense()
    return torch.from_numpy(dense).to(dtype=like.dtype, device=like.device)
