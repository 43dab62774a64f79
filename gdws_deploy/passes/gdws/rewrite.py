"""The ONNX pass: each chosen Conv becomes [Gather] -> depthwise Conv -> 1x1 Conv.

Written as an onnx-graphsurgeon pass: builders for the GDWS nodes registered on gs.Graph,
one function per lowering (how the depthwise kernels reach their input channels), then
cleanup().toposort(). Graphsurgeon objects never leave this module: it takes and returns
ModelProtos.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from gdws_deploy.ir.graph import ConvLayer, TensorType, adopt_model_fields
from gdws_deploy.passes.gdws.decompose import GdwsFactors

# A lowering replaces one Conv node (named by the str) by the GDWS form of the factors.
Lowering = Callable[[gs.Graph, gs.Node, str, GdwsFactors], None]

_SPATIAL_ATTRS = ("kernel_shape", "strides", "pads", "auto_pad", "dilations")


@gs.Graph.register()
def gdws_gather(self: gs.Graph, name: str, x: gs.Variable, channels: np.ndarray) -> gs.Variable:
    """x[:, channels]: the input channel of every depthwise kernel, in kernel order."""
    indices = gs.Constant(f"{name}/gdws_gather/indices", channels.astype(np.int64))
    out = _like(x, f"{name}/gdws_gather/output", channels=channels.size)
    attrs = {"axis": 1}
    self.layer(
        op="Gather", name=f"{name}/gdws_gather", inputs=[x, indices], outputs=[out], attrs=attrs
    )
    return out


@gs.Graph.register()
def gdws_depthwise(
    self: gs.Graph,
    name: str,
    x: gs.Variable,
    conv: gs.Node,
    kernels: np.ndarray,
    group: int,
    part: str = "",
) -> gs.Variable:
    """Conv with one (kh, kw) kernel per output channel and the spatial attributes of `conv`.

    part: a suffix for layers with several depthwise convs (`{name}/gdws_dw{part}`).
    """
    node = f"{name}/gdws_dw{part}"
    weight = gs.Constant(f"{node}/weight", kernels[:, None])
    out = _like(conv.outputs[0], f"{node}/output", channels=kernels.shape[0])
    attrs = {key: conv.attrs[key] for key in _SPATIAL_ATTRS if key in conv.attrs}
    attrs["group"] = group
    self.layer(op="Conv", name=node, inputs=[x, weight], outputs=[out], attrs=attrs)
    return out


@gs.Graph.register()
def gdws_pointwise(
    self: gs.Graph,
    name: str,
    x: gs.Variable,
    columns: np.ndarray,
    bias: Sequence[gs.Tensor],
    out: gs.Variable,
    part: str = "",
) -> gs.Variable:
    """1x1 Conv mixing the depthwise outputs into the original output (and its bias);
    part: as for gdws_depthwise (`{name}/gdws_pw{part}`)."""
    weight = gs.Constant(f"{name}/gdws_pw{part}/weight", columns[:, :, None, None])
    inputs = [x, weight, *bias]
    attrs = {"kernel_shape": [1, 1]}
    self.layer(op="Conv", name=f"{name}/gdws_pw{part}", inputs=inputs, outputs=[out], attrs=attrs)
    return out


def lower_exact(graph: gs.Graph, conv: gs.Node, name: str, factors: GdwsFactors) -> None:
    """The factors as they are: channel Gather only when channels keep unequal numbers
    of kernels; otherwise a depthwise conv with a channel multiplier (group = C).
    """
    x, out = conv.inputs[0], conv.outputs[0]
    per_channel = factors.kernels_per_channel()
    if np.all(per_channel == per_channel[0]):
        source, group = x, factors.in_channels
    else:
        source, group = graph.gdws_gather(name, x, factors.channels), factors.kernels
    hidden = graph.gdws_depthwise(name, source, conv, factors.depthwise, group)
    bias = conv.inputs[2:]
    conv.outputs.clear()
    graph.gdws_pointwise(name, hidden, factors.pointwise, bias, out)


def rewrite(
    model: onnx.ModelProto,
    layers: Sequence[Tuple[ConvLayer, GdwsFactors]],
    types: Mapping[str, TensorType],
    lowering: Lowering = lower_exact,
) -> onnx.ModelProto:
    """A new model with each layer's Conv replaced by its GDWS form.

    types: inferred tensor types, written into the output's value_info. Input, output and
    every other tensor keep their names; opsets, IR version and metadata stay as they are.
    """
    graph = gs.import_onnx(model)
    _annotate(graph, types)
    convs = [(graph.nodes[layer.index], layer.name, factors) for layer, factors in layers]
    for conv, name, factors in convs:
        lowering(graph, conv, name, factors)
    graph.cleanup().toposort()
    return adopt_model_fields(gs.export_onnx(graph), model)


def _annotate(graph: gs.Graph, types: Mapping[str, TensorType]) -> None:
    """Give every untyped variable its inferred type, so the output carries shapes."""
    for name, tensor in graph.tensors().items():
        known = types.get(name)
        if isinstance(tensor, gs.Variable) and tensor.dtype is None and known is not None:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(known.elem_type)
            tensor.shape = None if known.shape is None else list(known.shape)


def _like(tensor: gs.Variable, name: str, channels: int) -> gs.Variable:
    """A new variable shaped like the NCHW `tensor` but with `channels` channels."""
    shape = None if tensor.shape is None else [tensor.shape[0], channels, *tensor.shape[2:]]
    return gs.Variable(name, dtype=tensor.dtype, shape=shape)
