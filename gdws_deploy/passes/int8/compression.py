"""--method int8 as a CompressionPass: INT8 quantization alone, no structural rewrite.

As a pass it takes every Conv and plans nothing for it (each keeps its form), so the
pipeline's steps, names and report hold for it as for any pass; the pipeline then
quantizes the model, as it does after any pass asked to (ConvertOptions.int8).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence

import onnx

from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer
from gdws_deploy.passes.base import CompressionPass, LayerOption
from gdws_deploy.passes.int8 import QUANTIZE_ONLY

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions


class Int8Pass(CompressionPass):
    """Static INT8 quantization only (passes.int8.quantize), after no rewrite."""

    name = QUANTIZE_ONLY
    label = "INT8"

    def why_not(self, layer: ConvLayer) -> Optional[str]:
        return None

    def cannot_shrink(self, layer: ConvLayer) -> Optional[str]:
        return "kept: INT8 quantizes every layer, it rewrites none"

    def plan(
        self, analyzed: AnalyzedModel, layers: Sequence[ConvLayer], options: ConvertOptions
    ) -> Dict[int, LayerOption]:
        return {}

    def write(self, analyzed: AnalyzedModel, chosen: Mapping[int, LayerOption]) -> onnx.ModelProto:
        return analyzed.model
