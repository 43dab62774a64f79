"""How structured a model's KxK kernels are: the energy share of the top singular values.

GDWS keeps a few rank-1 terms of each input channel's matrix W_c (M x kh*kw); how much
of W_c's energy its largest singular values carry says how far a model can be compressed
before accuracy goes. Robust CIFAR/ImageNet models are structured (top-1 share well above
the 1/9 of an isotropic 3x3 kernel); a stand-in model is only fair if it is too.
"""

from __future__ import annotations

from typing import Dict, List, Union

import numpy as np
import onnx

from gdws_deploy.ir.analyze import AnalyzedModel, analyze
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.passes.gdws.decompose import ChannelSpectra

TOP = 3


def top_energy_shares(weight: np.ndarray, top: int = TOP) -> np.ndarray:
    """Mean over input channels of the energy share of the largest 1..top singular values.

    weight: (M, C, kh, kw). Returns (top,) non-decreasing: entry i is the mean over
    channels c of sum_{j<=i} s_cj^2 / sum_j s_cj^2. Channels whose kernels are all zero
    carry no energy and are left out of the mean (a share of nothing is undefined).
    """
    energy = ChannelSpectra.from_weight(weight).s ** 2
    total = energy.sum(axis=1)
    live = total > 0
    cumulative = np.cumsum(energy[live], axis=1)[:, :top] / total[live, None]
    if cumulative.shape[1] < top:
        cumulative = np.pad(cumulative, ((0, 0), (0, top - cumulative.shape[1])), mode="edge")
    return cumulative.mean(axis=0) if live.any() else np.full(top, np.nan)


def onnx_conv_spectra(
    model: Union[onnx.ModelProto, AnalyzedModel], top: int = TOP
) -> List[Dict[str, object]]:
    """top_energy_shares of every Conv the convert pass could rewrite (the first one
    included; of an analyzed model, those of its selection), in graph order: one record
    per layer with its name, weight shape and shares."""
    analyzed = model if isinstance(model, AnalyzedModel) else analyze(model, all_layers=True)
    return [
        {
            "name": layer.name,
            "weight_shape": list(layer.weight_shape),
            **{
                f"top{i + 1}": round(float(share), 4)
                for i, share in enumerate(top_energy_shares(layer.weight, top))
            },
        }
        for layer in GdwsPass().select(analyzed).eligible
    ]
