"""Lowerings: the ONNX form a GDWS layer takes, one function per form.

Every form computes exactly what the factors say; they differ in how the depthwise kernels
reach their input channels, which is what decides speed on a backend:

gather  the factors as they are (rewrite.lower_exact): a channel Gather feeds the
        depthwise conv when channels keep unequal numbers of kernels.
pad     m = the most kernels any channel keeps; every channel gets m (zero kernels, zero
        pointwise columns), so no Gather is needed. Emitted as m depthwise convs with
        group = C, concatenated: one Conv with a channel multiplier is the same arithmetic
        but leaves onnxruntime's depthwise kernel (measured several times slower here).
sum     the pad form's slices, each through its own pointwise conv (its slice of the
        pointwise columns), summed: no Concat, and onnxruntime fuses each Add into the next
        pointwise conv (its NCHWc Sum input), so time grows linearly with m.
fold    the input comes from a Conv through per-channel ops only (BatchNormalization,
        activations, pooling), each feeding nothing else: that Conv emits the gathered
        channels itself (its weight rows, bias and the ops' parameters gathered), so the
        Gather disappears. Layers without such a chain get the gather form.
dense   the original Conv stays.

The GDWS forms also fold a BatchNormalization that follows the pointwise conv into its
weight and bias, and fold first folds a BatchNormalization that follows the producer.
ALIGNED_LOWERINGS (what tuning measures and emits) also round the kernel count of a
gathered or folded depthwise conv up to a multiple of CHANNEL_MULTIPLE with zero kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from gdws_deploy.passes.gdws.decompose import GdwsFactors
from gdws_deploy.passes.gdws.rewrite import Lowering, lower_exact

# Ops that act on each channel alone and whose only non-data inputs are scalar constants.
ELEMENTWISE = frozenset(
    {
        *("Relu", "LeakyRelu", "Clip", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid"),
        *("HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Gelu"),
        *("Identity", "Neg", "Abs", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Floor"),
        *("Ceil", "Round", "Sign", "MaxPool", "AveragePool", "LpPool"),
    }
)
# Aligned gather and fold forms round their kernel count up to a multiple of this with
# zero kernels: onnxruntime's blocked (NCHWc) convs take channel counts in multiples of 8;
# any other count runs its generic grouped conv (a depthwise conv measured 8x slower).
CHANNEL_MULTIPLE = 8
# BatchNormalization's per-channel inputs: scale, B, mean, var.
_BN_PARAMS = range(1, 5)


def lower_gather(
    graph: gs.Graph, conv: gs.Node, name: str, factors: GdwsFactors, multiple: int = 1
) -> None:
    """The exact form (a gathered kernel count rounded up to `multiple`); a following
    BatchNormalization goes into the pointwise conv."""
    out = conv.outputs[0]
    per_channel = factors.kernels_per_channel()
    uniform = per_channel.min() == per_channel.max()  # no Gather: a channel multiplier
    lower_exact(graph, conv, name, factors if uniform else aligned(factors, multiple))
    fuse_following_batchnorm(graph, out.inputs[0])


def lower_pad(graph: gs.Graph, conv: gs.Node, name: str, factors: GdwsFactors) -> None:
    """m depthwise convs with group = C over the input (slice j holds each channel's j-th
    kernel, zero where a channel has fewer), concatenated, then the pointwise conv."""
    kernels, columns = padded(factors)
    slices = [
        graph.gdws_depthwise(name, conv.inputs[0], conv, slice_kernels, factors.in_channels, part)
        for slice_kernels, part in zip(kernels, _slice_names(len(kernels)))
    ]
    hidden = slices[0] if len(slices) == 1 else graph.gdws_concat(name, slices)
    _replace_by_pointwise(graph, conv, name, hidden, columns)


def lower_sum(graph: gs.Graph, conv: gs.Node, name: str, factors: GdwsFactors) -> None:
    """Slice j (each channel's j-th kernel, zero where a channel has fewer) through its own
    depthwise and pointwise convs; the partial outputs are added up."""
    kernels, columns = padded(factors)
    slices, channels = len(kernels), factors.in_channels
    x, out, bias = conv.inputs[0], conv.outputs[0], conv.inputs[2:]
    hidden = [
        graph.gdws_depthwise(name, x, conv, slice_kernels, channels, part)
        for slice_kernels, part in zip(kernels, _slice_names(slices))
    ]
    if slices == 1:
        _replace_by_pointwise(graph, conv, name, hidden[0], columns)
        return
    conv.outputs.clear()
    partial = [
        graph.gdws_pointwise(
            name,
            h,
            columns[:, j * channels : (j + 1) * channels],
            bias if j == 0 else [],
            _like_output(out, f"{name}/gdws_pw{part}/output"),
            part,
        )
        for j, (h, part) in enumerate(zip(hidden, _slice_names(slices)))
    ]
    total = partial[0]
    for j, term in enumerate(partial[1:], start=1):
        last = j == slices - 1
        added = out if last else _like_output(out, f"{name}/gdws_sum{j}/output")
        graph.layer(op="Add", name=f"{name}/gdws_sum{j}", inputs=[total, term], outputs=[added])
        total = added
    fuse_batchnorm_after(graph, out.inputs[0], [term.inputs[0] for term in partial])


def lower_fold(
    graph: gs.Graph, conv: gs.Node, name: str, factors: GdwsFactors, multiple: int = 1
) -> None:
    """The producer emits x[:, channels] (their count rounded up to `multiple`); the
    depthwise conv then needs no Gather. Without a foldable chain: the gather form."""
    chain = fold_chain(graph, conv)
    if chain is None:
        lower_gather(graph, conv, name, factors, multiple)
        return
    if fuse_following_batchnorm(graph, chain[0]):
        chain = fold_chain(graph, conv)
    factors = aligned(factors, multiple)
    gather_channels(chain, factors.channels)
    hidden = graph.gdws_depthwise(name, conv.inputs[0], conv, factors.depthwise, factors.kernels)
    _replace_by_pointwise(graph, conv, name, hidden, factors.pointwise)


def lower_dense(graph: gs.Graph, conv: gs.Node, name: str, factors: GdwsFactors) -> None:
    """Keep the original Conv: where GDWS would not be faster."""


LOWERINGS: Mapping[str, Lowering] = {
    "gather": lower_gather,
    "pad": lower_pad,
    "sum": lower_sum,
    "fold": lower_fold,
    "dense": lower_dense,
}
ALIGNED_LOWERINGS: Mapping[str, Lowering] = {
    **LOWERINGS,
    "gather": functools.partial(lower_gather, multiple=CHANNEL_MULTIPLE),
    "fold": functools.partial(lower_fold, multiple=CHANNEL_MULTIPLE),
}


@dataclass(frozen=True)
class PerLayer:
    """A Lowering that applies each layer's own form, by Conv name."""

    forms: Mapping[str, str]
    lowerings: Mapping[str, Lowering] = field(default_factory=lambda: LOWERINGS)

    def __call__(self, graph: gs.Graph, conv: gs.Node, name: str, factors: GdwsFactors) -> None:
        self.lowerings[self.forms[name]](graph, conv, name, factors)


def aligned(factors: GdwsFactors, multiple: int) -> GdwsFactors:
    """The factors with zero kernels (and zero pointwise columns) on their last channel up
    to a multiple of `multiple` kernels."""
    extra = -factors.kernels % multiple
    if extra == 0:
        return factors
    depthwise, pointwise = factors.depthwise, factors.pointwise
    return replace(
        factors,
        channels=np.concatenate([factors.channels, np.repeat(factors.channels[-1:], extra)]),
        depthwise=np.concatenate(
            [depthwise, np.zeros((extra, *depthwise.shape[1:]), depthwise.dtype)]
        ),
        pointwise=np.concatenate(
            [pointwise, np.zeros((len(pointwise), extra), pointwise.dtype)], 1
        ),
    )


def padded(factors: GdwsFactors) -> Tuple[np.ndarray, np.ndarray]:
    """The factors with m kernels on every channel.

    Returns kernels (m, C, kh, kw), slice j holding each channel's j-th kernel (zeros
    past its count), and pointwise columns (M, m*C) in the same slice-major order.
    """
    channels = factors.channels
    position = np.arange(channels.size) - np.searchsorted(channels, channels, side="left")
    slices = int(factors.kernels_per_channel().max())
    c, (m, _) = factors.in_channels, factors.pointwise.shape
    kernels = np.zeros((slices, c, *factors.depthwise.shape[1:]), factors.depthwise.dtype)
    kernels[position, channels] = factors.depthwise
    columns = np.zeros((m, slices, c), factors.pointwise.dtype)
    columns[:, position, channels] = factors.pointwise
    return kernels, columns.reshape(m, slices * c)


def fold_chain(graph: gs.Graph, conv: gs.Node) -> Optional[List[gs.Node]]:
    """[producer Conv, per-channel nodes...] feeding `conv`'s input and nothing else.

    None when the input is a graph input or output, has another consumer, or comes
    through an op that mixes channels or has per-channel parameters we cannot gather.
    """
    between = []
    tensor = conv.inputs[0]
    while True:
        if len(tensor.outputs) != 1 or len(tensor.inputs) != 1 or _is_output(graph, tensor):
            return None
        node = tensor.inputs[0]
        if len(node.outputs) != 1:
            return None
        if node.op == "Conv":
            return [node, *reversed(between)] if _gatherable_conv(node) else None
        if not _per_channel(node):
            return None
        between.append(node)
        tensor = node.inputs[0]


def gather_channels(chain: List[gs.Node], channels: np.ndarray) -> None:
    """Make the chain's output x[:, channels]: gather the producer's weight rows and bias
    and every per-channel parameter along the chain; fix the tensors' channel counts."""
    producer, *between = chain
    _gather_inputs(producer, range(1, len(producer.inputs)), channels, axis=0)
    for node in between:
        if node.op == "BatchNormalization":
            _gather_inputs(node, _BN_PARAMS, channels, axis=0)
        elif node.op == "PRelu":
            slope = node.inputs[1].values
            if slope.size > 1:
                _gather_inputs(node, [1], channels, axis=slope.ndim - 3)
    for node in chain:
        tensor = node.outputs[0]
        if tensor.shape is not None and len(tensor.shape) > 1:
            tensor.shape = [tensor.shape[0], int(channels.size), *tensor.shape[2:]]


def fuse_following_batchnorm(graph: gs.Graph, conv: gs.Node) -> bool:
    """Fold a BatchNormalization that alone reads `conv`'s output into its weight and bias.
    Returns whether it fused."""
    return _gatherable_conv(conv) and fuse_batchnorm_after(graph, conv, [conv])


def fuse_batchnorm_after(graph: gs.Graph, producer: gs.Node, convs: Sequence[gs.Node]) -> bool:
    """Fold a BatchNormalization that alone reads `producer`'s output into `convs`, whose
    outputs sum to it (`producer` itself, or the pointwise convs of the sum form).

    scale = gamma / sqrt(var + eps): each W' = W * scale per output row; the first conv
    takes b' = (b - mean) * scale + beta, the others b' = b * scale. Returns whether it
    fused (constant parameters, inference mode, one output).
    """
    out = producer.outputs[0]
    if len(out.outputs) != 1 or _is_output(graph, out):
        return False
    bn = out.outputs[0]
    params = bn.inputs[_BN_PARAMS.start : _BN_PARAMS.stop]
    if (
        bn.op != "BatchNormalization"
        or len(bn.outputs) != 1
        or bn.attrs.get("training_mode", 0)
        or len(params) != 4
        or not all(isinstance(p, gs.Constant) for p in params)
    ):
        return False
    gamma, beta, mean, var = (np.asarray(p.values, np.float64) for p in params)
    scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    for j, conv in enumerate(convs):
        weight = conv.inputs[1].values
        bias = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(weight.shape[0])
        fused_weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
        fused_bias = (bias - mean) * scale + beta if j == 0 else bias * scale
        tag = _tag(conv)
        conv.inputs[1] = gs.Constant(f"{tag}/bn_fused/weight", fused_weight.astype(weight.dtype))
        if j == 0 or len(conv.inputs) > 2:
            bias_tensor = gs.Constant(f"{tag}/bn_fused/bias", fused_bias.astype(weight.dtype))
            if len(conv.inputs) > 2:
                conv.inputs[2] = bias_tensor
            else:
                conv.inputs.append(bias_tensor)
    bn_out = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    producer.outputs[0] = bn_out
    return True


def _like_output(tensor: gs.Variable, name: str) -> gs.Variable:
    """A new tensor shaped like the layer's output `tensor`."""
    return gs.Variable(name, dtype=tensor.dtype, shape=tensor.shape)


@gs.Graph.register()
def gdws_concat(self: gs.Graph, name: str, parts: List[gs.Variable]) -> gs.Variable:
    """The depthwise slices of the pad form, one after another along the channels."""
    first = parts[0]
    shape = None
    if first.shape is not None:
        shape = [first.shape[0], sum(part.shape[1] for part in parts), *first.shape[2:]]
    out = gs.Variable(f"{name}/gdws_concat/output", dtype=first.dtype, shape=shape)
    self.layer(
        op="Concat", name=f"{name}/gdws_concat", inputs=parts, outputs=[out], attrs={"axis": 1}
    )
    return out


def _replace_by_pointwise(
    graph: gs.Graph, conv: gs.Node, name: str, hidden: gs.Variable, columns: np.ndarray
) -> None:
    """The pointwise conv takes `conv`'s output and bias; a BatchNormalization after it
    is folded in."""
    out, bias = conv.outputs[0], conv.inputs[2:]
    conv.outputs.clear()
    graph.gdws_pointwise(name, hidden, columns, bias, out)
    fuse_following_batchnorm(graph, out.inputs[0])


def _slice_names(count: int) -> List[str]:
    """Node name suffixes of the pad form's depthwise slices: none when there is one."""
    return [""] if count == 1 else [str(j) for j in range(count)]


def _gather_inputs(node: gs.Node, positions, channels: np.ndarray, axis: int) -> None:
    """Replace constant inputs of `node` by their entries at `channels` along `axis`."""
    tag = _tag(node)
    for position in positions:
        tensor = node.inputs[position]
        values = np.take(tensor.values, channels, axis=axis)
        node.inputs[position] = gs.Constant(f"{tag}/gdws_fold/{position}", values)


def _gatherable_conv(node: gs.Node) -> bool:
    """A 2-D, ungrouped Conv with constant weight and bias: its output rows can be gathered."""
    return (
        node.op == "Conv"
        and node.attrs.get("group", 1) == 1
        and len(node.inputs) >= 2
        and all(isinstance(t, gs.Constant) for t in node.inputs[1:])
        and node.inputs[1].values.ndim == 4
    )


def _per_channel(node: gs.Node) -> bool:
    """Does `node` act on each channel alone, with parameters we can gather?"""
    params = node.inputs[1:]
    if not all(isinstance(p, gs.Constant) for p in params):
        return False
    if node.op == "BatchNormalization":
        return len(params) == 4 and not node.attrs.get("training_mode", 0)
    if node.op == "PRelu":
        slope = params[0].values
        return slope.size == 1 or (
            slope.ndim >= 3 and slope.shape[-3] == slope.size and slope.shape[-2:] == (1, 1)
        )
    return node.op in ELEMENTWISE and all(p.values.size == 1 for p in params)


def _is_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Graph outputs must keep their channels, whoever else reads them."""
    return any(output.name == tensor.name for output in graph.outputs)


def _tag(node: gs.Node) -> str:
    return node.name or node.outputs[0].name
