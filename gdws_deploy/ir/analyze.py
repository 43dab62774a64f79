"""Analyze a model once: check it, infer its types, count its MACs, find its Convs.

Every step after loading (the conversion, calibration, spectra, speed tuning) reads the
same facts about the model; computing them once and passing one AnalyzedModel on keeps
the (costly) checker and shape inference from running again in each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple, Union

import onnx

from gdws_deploy.ir.graph import (
    ConvLayer,
    LoadedModel,
    TensorType,
    check_and_infer,
    count_macs,
    find_convs,
)


@dataclass(frozen=True)
class AnalyzedModel:
    """A checked model with its tensor types, MACs per node index (batch 1) and Convs.

    convs: every Conv in graph order, each eligible or with the reason it is not.
    """

    model: onnx.ModelProto
    types: Dict[str, TensorType]
    macs: Dict[int, int]
    convs: Tuple[ConvLayer, ...]

    @property
    def total_macs(self) -> int:
        """MACs of the whole model at batch 1."""
        return sum(self.macs.values())

    @property
    def eligible(self) -> Tuple[ConvLayer, ...]:
        """The Convs a conversion may rewrite, in graph order."""
        return tuple(layer for layer in self.convs if layer.eligible)


def analyze(
    model: Union[onnx.ModelProto, LoadedModel],
    all_layers: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> AnalyzedModel:
    """Check `model` and find its Convs, selected by the first-conv rule and the
    include / exclude globs (graph.find_convs); GdwsError when the checker rejects it."""
    proto = model.model if isinstance(model, LoadedModel) else model
    types = check_and_infer(proto)
    macs = count_macs(proto, types)
    convs = find_convs(proto, types, macs, all_layers, include, exclude)
    return AnalyzedModel(proto, types, macs, tuple(convs))
