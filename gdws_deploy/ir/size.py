"""How much storage a model's weights need, counted the way compression papers count it.

ATMC (Gui et al., NeurIPS 2019) reports a model's size as non-zeros x bits per weight;
`compare` puts every method on that one scale, read from the graph itself rather than
from what a pass says it did, so a dense float model, a pruned one, an INT8 one and a
k-means-shared one are counted by the same rule.
"""

from __future__ import annotations

from typing import Dict, Optional, Set

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from gdws_deploy.ir.graph import graph_tensors

# Tensor types that hold weights (shape and index tensors are int64/int32: not counted).
_WEIGHT_BITS = {
    TensorProto.FLOAT: 32,
    TensorProto.DOUBLE: 64,
    TensorProto.FLOAT16: 16,
    TensorProto.BFLOAT16: 16,
    TensorProto.INT8: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
}


def weight_bits(model: onnx.ModelProto) -> int:
    """Bits the model's weights need: per weight tensor, its non-zeros times the bits of
    each, the smaller of its type's width and a codebook's index width (plus the codebook
    itself) -- a float tensor taking only 2^b distinct values, as k-means weight sharing
    leaves it, is stored as b-bit indices. Zeros cost nothing, as in ATMC's count (sparse
    indices are not counted, as there). A float weight every reader of which quantizes it
    (an INT8 model's, kept float for TensorRT to quantize) counts at the quantized width.
    `model` holds its weights in memory, as ir.graph.load_model returns it."""
    quantized = _quantized_widths(model.graph)
    total = 0
    for tensor in graph_tensors(model.graph):
        width = quantized.get(tensor.name, _WEIGHT_BITS.get(tensor.data_type))
        if width is None:
            continue
        values = numpy_helper.to_array(tensor).ravel()
        nonzero = values[values != 0]
        distinct = np.unique(nonzero).size
        index_bits = max(1, int(np.ceil(np.log2(max(distinct, 2)))))
        total += min(nonzero.size * width, nonzero.size * index_bits + distinct * width)
    return int(total)


def _quantized_widths(graph: onnx.GraphProto) -> Dict[str, int]:
    """Initializers read only as QuantizeLinear's input, by the width they are quantized to
    (the zero point's type; uint8 without one)."""
    types = {tensor.name: tensor.data_type for tensor in graph.initializer}
    widths: Dict[str, Set[Optional[int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            width = None
            if node.op_type == "QuantizeLinear" and index == 0:
                zero = node.input[2] if len(node.input) > 2 else ""
                width = _WEIGHT_BITS.get(types.get(zero, TensorProto.UINT8))
            widths.setdefault(name, set()).add(width)
    return {
        name: next(iter(found))
        for name, found in widths.items()
        if name in types and len(found) == 1 and None not in found
    }
