"""The ONNX pass: each chosen Conv becomes Gather -> Conv(group = n) -> Gather.

The first Gather lines up every filter group's kept input channels, the grouped Conv
computes the kept kernels only, and the second Gather puts its outputs (filters in group
order) back in the original channel order, so the layer computes exactly the dense Conv
with the pruned kernels zeroed. Built with onnx-graphsurgeon, as passes/gdws/rewrite.py;
graphsurgeon objects never leave this module.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from gdws_deploy.ir.graph import ConvLayer, adopt_model_fields
from gdws_deploy.passes.gkp.kernels import GkpFactors


@gs.Graph.register()
def gkp_gather(
    self: gs.Graph, name: str, x: gs.Tensor, indices: np.ndarray, axis: int, out: gs.Variable
) -> gs.Variable:
    """x.take(indices, axis) into `out`."""
    constant = gs.Constant(f"{name}/indices", indices.astype(np.int64))
    attrs = {"axis": axis}
    self.layer(op="Gather", name=name, inputs=[x, constant], outputs=[out], attrs=attrs)
    return out


def lower_grouped(graph: gs.Graph, conv: gs.Node, name: str, factors: GkpFactors) -> None:
    """Turn `conv` in place into its grouped form between two Gathers; a Gather that
    would copy its input unchanged is left out."""
    x, out = conv.inputs[0], conv.outputs[0]
    channels = factors.kept.reshape(-1)
    if not np.array_equal(channels, np.arange(conv.inputs[1].shape[1])):
        x = graph.gkp_gather(f"{name}/gkp_in", x, channels, 1, gs.Variable(f"{name}/gkp_in/out"))
    conv.inputs[0] = x
    conv.inputs[1] = gs.Constant(f"{name}/gkp/weight", factors.weight)
    if len(conv.inputs) > 2:
        bias = conv.inputs[2]
        if isinstance(bias, gs.Constant):
            conv.inputs[2] = gs.Constant(f"{name}/gkp/bias", bias.values[factors.order])
        else:  # a bias computed at run time is put in group order there
            reordered = gs.Variable(f"{name}/gkp_bias/out")
            conv.inputs[2] = graph.gkp_gather(f"{name}/gkp_bias", bias, factors.order, 0, reordered)
    conv.attrs["group"] = factors.groups
    if np.array_equal(factors.order, np.arange(factors.order.size)):
        return
    back = np.argsort(factors.order)
    grouped = gs.Variable(f"{name}/gkp/out")
    conv.outputs[0] = grouped
    graph.gkp_gather(f"{name}/gkp_out", grouped, back, 1, out)


def rewrite(
    model: onnx.ModelProto, layers: Sequence[Tuple[ConvLayer, GkpFactors]]
) -> onnx.ModelProto:
    """A new model with each layer's Conv in its grouped form; every other tensor keeps
    its name; opsets and metadata stay, the IR version as ir.graph.rewritten_ir_version
    says."""
    graph = gs.import_onnx(model)
    convs = [(graph.nodes[layer.index], layer.name, factors) for layer, factors in layers]
    for conv, name, factors in convs:
        lower_grouped(graph, conv, name, factors)
    graph.cleanup().toposort()
    return adopt_model_fields(gs.export_onnx(graph), model)
