"""How much storage a model's weights need, counted the way compression papers count it.

ATMC (Gui et al., NeurIPS 2019) reports a model's size as non-zeros x bits per weight;
`compare` puts every method on that one scale, read from the graph itself rather than
from what a pass says it did, so a dense float model, a pruned one, an INT8 one and a
k-means-shared one are counted by the same rule.
"""

from __future__ import annotations

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
    indices are not counted, as there). `model` holds its weights in memory, as
    ir.graph.load_model returns it."""
    total = 0
    for tensor in graph_tensors(model.graph):
        width = _WEIGHT_BITS.get(tensor.data_type)
        if width is None:
            continue
        values = numpy_helper.to_array(tensor).ravel()
        nonzero = values[values != 0]
        distinct = np.unique(nonzero).size
        index_bits = max(1, int(np.ceil(np.log2(max(distinct, 2)))))
        total += min(nonzero.size * width, nonzero.size * index_bits + distinct * width)
    return int(total)
