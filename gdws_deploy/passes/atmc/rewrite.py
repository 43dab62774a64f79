"""The ONNX pass: each chosen Conv becomes kh x kw Conv (r filters) -> 1x1 Conv
[+ the sparse residual's Conv, added].

The first Conv keeps the original's spatial attributes (strides, pads, dilations), the
1x1 Conv takes its bias, so the layer computes (U V + C) * x + b. Built with
onnx-graphsurgeon, as passes/gdws/rewrite.py; graphsurgeon objects never leave this
module. Weights shared by k-means are plain float tensors taking at most 2^b values:
ir.size.weight_bits reads their bits off the graph.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import onnx
import onnx_graphsurgeon as gs

from gdws_deploy.ir.graph import ConvLayer, adopt_model_fields
from gdws_deploy.passes.atmc.factors import AtmcFactors

_SPATIAL_ATTRS = ("kernel_shape", "strides", "pads", "auto_pad", "dilations")


def lower_low_rank(graph: gs.Graph, conv: gs.Node, name: str, factors: AtmcFactors) -> None:
    """Replace `conv` by its ATMC form."""
    x, out = conv.inputs[0], conv.outputs[0]
    spatial = {key: conv.attrs[key] for key in _SPATIAL_ATTRS if key in conv.attrs}
    weights = {
        f"{name}/atmc_v/weight": factors.first,
        f"{name}/atmc_u/weight": factors.second,
        f"{name}/atmc_c/weight": factors.residual,
    }
    v, u, c = (
        gs.Constant(key, value) if value is not None else None for key, value in weights.items()
    )
    hidden = gs.Variable(f"{name}/atmc_v/output", dtype=out.dtype)
    graph.layer(op="Conv", name=f"{name}/atmc_v", inputs=[x, v], outputs=[hidden], attrs=spatial)
    bias = conv.inputs[2:]
    conv.outputs.clear()
    low = out if c is None else gs.Variable(f"{name}/atmc_u/output", dtype=out.dtype)
    attrs = {"kernel_shape": [1, 1]}
    graph.layer(
        op="Conv", name=f"{name}/atmc_u", inputs=[hidden, u, *bias], outputs=[low], attrs=attrs
    )
    if c is not None:
        sparse = gs.Variable(f"{name}/atmc_c/output", dtype=out.dtype)
        graph.layer(
            op="Conv", name=f"{name}/atmc_c", inputs=[x, c], outputs=[sparse], attrs=spatial
        )
        graph.layer(op="Add", name=f"{name}/atmc_add", inputs=[low, sparse], outputs=[out])


def rewrite(
    model: onnx.ModelProto, layers: Sequence[Tuple[ConvLayer, AtmcFactors]]
) -> onnx.ModelProto:
    """A new model with each layer's Conv in its ATMC form; every other tensor keeps its
    name; opsets and metadata stay, the IR version as ir.graph.rewritten_ir_version says."""
    graph = gs.import_onnx(model)
    convs = [(graph.nodes[layer.index], layer.name, factors) for layer, factors in layers]
    for conv, name, factors in convs:
        lower_low_rank(graph, conv, name, factors)
    graph.cleanup().toposort()
    return adopt_model_fields(gs.export_onnx(graph), model)
