"""A differentiable torch mirror of an ONNX graph, so attacks and alphas get real gradients.

Our own small interpreter (onnx2torch would drag in torchvision). Everything that can be
decided at build time is: each node is compiled once into a closure with its attributes,
padding and constant operands baked in, constants are folded, and `forward` is a straight
list of calls over a flat slot table. Initializers become parameters (running statistics:
buffers) named after their ONNX names, sanitized for torch; `onnx_names` maps back.

Semantics are those of inference: BatchNormalization uses its running statistics, Dropout
is the identity, whatever `train()`/`eval()` says.

Half-precision models are mirrored in float32: attacks need the gradients' precision, and
the verdicts come from the real model anyway. Float16 initializers and constants are
promoted, Cast to float16 casts to float32, float16 inputs are cast at the boundary.

An empty input name is an omitted optional input, in any op: the op's callable gets None.

Tensors that only describe shapes (Shape -> Gather -> Concat -> Reshape in legacy exports with
a dynamic batch) stay small CPU tensors; the mirror moves one onto the data's device only
where it meets data.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)
from onnx import helper, numpy_helper
from torch import Tensor, nn

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import load_model, node_name

# What a tensor is at build time: a float initializer, a known constant, a runtime value that
# depends only on input shapes (kept on the CPU), or a runtime value that depends on data.
PARAM, CONST, SHAPE, DATA = "param", "const", "shape", "data"

Compiled = Callable[..., Any]


@dataclass
class NodeInfo:
    """What an op compiler may look at: the node, its attributes and its known inputs."""

    node: onnx.NodeProto
    name: str  # the node's name, or graph.node_name's stand-in
    attrs: Dict[str, Any]
    consts: List[Optional[np.ndarray]]  # per input: value when known at build time
    opset: int

    def has_input(self, index: int) -> bool:
        return index < len(self.node.input) and bool(self.node.input[index])

    def const(self, index: int) -> Optional[np.ndarray]:
        """The build-time value of input `index` (None when absent or only known at runtime)."""
        return self.consts[index] if self.has_input(index) else None

    def known(self, index: int) -> bool:
        """Whether input `index` is absent or has a build-time value."""
        return not self.has_input(index) or self.consts[index] is not None

    def attr_or_input(self, name: str, index: int) -> Tuple[bool, Optional[List[int]]]:
        """(known, ints) for an int list given as attribute (old opsets) or input (new)."""
        if name in self.attrs:
            return True, [int(v) for v in self.attrs[name]]
        return self.known(index), _optional_ints(self.const(index))


def _int_list(value: Union[np.ndarray, torch.Tensor, Sequence[int]]) -> List[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _optional_ints(value: Any) -> Optional[List[int]]:
    return None if value is None else _int_list(value)


_OPS: Dict[str, Callable[[NodeInfo], Compiled]] = {}
# input positions an op reads as host-side integers (shapes, axes, pads): never moved to a device
_HOST_INPUTS: Dict[str, Tuple[int, ...]] = {}


def _op(*names: str, host: Tuple[int, ...] = ()) -> Callable:
    def register(compiler: Callable[[NodeInfo], Compiled]) -> Callable[[NodeInfo], Compiled]:
        for name in names:
            _OPS[name] = compiler
            _HOST_INPUTS[name] = host
        return compiler

    return register


# ----------------------------------------------------------------------------------------
# Elementwise


_UNARY = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Abs": torch.abs,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Erf": torch.erf,
    "Reciprocal": torch.reciprocal,
    "Not": torch.logical_not,
    "HardSwish": F.hardswish,
}

_BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
}


@_op(*_UNARY)
def _unary(info: NodeInfo) -> Compiled:
    return _UNARY[info.node.op_type]


@_op(*_BINARY)
def _binary(info: NodeInfo) -> Compiled:
    return _BINARY[info.node.op_type]


@_op("Div")
def _div(info: NodeInfo) -> Compiled:
    def divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point() or b.is_floating_point():
            return torch.div(a, b)
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates

    return divide


@_op("Identity", "Dropout")
def _identity(info: NodeInfo) -> Compiled:
    if len(info.node.output) > 1 and info.node.output[1]:
        return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))
    return lambda x, *_: x


@_op("LeakyRelu")
def _leaky_relu(info: NodeInfo) -> Compiled:
    slope = float(info.attrs.get("alpha", 0.01))
    return lambda x: F.leaky_relu(x, slope)


@_op("PRelu")
def _prelu(info: NodeInfo) -> Compiled:
    return lambda x, slope: torch.where(x < 0, x * slope, x)


@_op("HardSigmoid")
def _hard_sigmoid(info: NodeInfo) -> Compiled:
    alpha = float(info.attrs.get("alpha", 0.2))
    beta = float(info.attrs.get("beta", 0.5))
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@_op("Clip")
def _clip(info: NodeInfo) -> Compiled:
    if info.opset < 11:
        low, high = info.attrs.get("min"), info.attrs.get("max")
        return lambda x: torch.clamp(x, low, high)
    if info.known(1) and info.known(2):
        low, high = (None if v is None else float(v) for v in (info.const(1), info.const(2)))
        return lambda x, *_: torch.clamp(x, low, high)
    return lambda x, low=None, high=None: torch.clamp(x, low, high)


@_op("Where")
def _where(info: NodeInfo) -> Compiled:
    return torch.where


@_op("Cast")
def _cast(info: NodeInfo) -> Compiled:
    dtype = _torch_dtype(int(info.attrs["to"]))
    return lambda x: x.to(dtype)


def _torch_dtype(onnx_type: int) -> torch.dtype:
    """The dtype the mirror computes a tensor of this ONNX type in (float16 -> float32)."""
    try:
        dtype = helper.tensor_dtype_to_np_dtype(onnx_type)
        return torch.from_numpy(np.empty(0, _computed_dtype(np.dtype(dtype)))).dtype
    except (KeyError, TypeError) as error:
        raise GdwsError(f"mirror: unsupported tensor type {onnx_type}") from error


def _computed_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _promoted(value: np.ndarray) -> np.ndarray:
    """A build-time value as the mirror computes with it (float16 -> float32)."""
    return value.astype(_computed_dtype(value.dtype), copy=False)


@_op("Softmax")
def _softmax(info: NodeInfo) -> Compiled:
    if info.opset >= 13:
        axis = int(info.attrs.get("axis", -1))
        return lambda x: torch.softmax(x, axis)
    axis = int(info.attrs.get("axis", 1))  # old opsets: coerce to 2-D at `axis`

    def softmax_2d(x: torch.Tensor) -> torch.Tensor:
        rows = math.prod(x.shape[: axis % x.dim()])
        return torch.softmax(x.reshape(rows, -1), 1).reshape(x.shape)

    return softmax_2d


# ----------------------------------------------------------------------------------------
# Convolution and normalization


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> Tuple[int, int]:
    extent = (kernel - 1) * dilation + 1
    total = max(0, (math.ceil(size / stride) - 1) * stride + extent - size)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


class SpatialPadding:
    """ONNX `pads`/`auto_pad` for the spatial axes, resolved at build time when static."""

    def __init__(
        self,
        attrs: Dict[str, Any],
        kernel: Sequence[int],
        strides: Sequence[int],
        dilations: Sequence[int],
    ) -> None:
        rank = len(kernel)
        self.auto_pad = attrs.get("auto_pad", b"NOTSET")
        self.auto_pad = (
            self.auto_pad.decode() if isinstance(self.auto_pad, bytes) else self.auto_pad
        )
        self.kernel, self.strides, self.dilations = list(kernel), list(strides), list(dilations)
        pads = [int(p) for p in attrs.get("pads", [0] * (2 * rank))]
        if self.auto_pad == "VALID":
            pads = [0] * (2 * rank)
        self.static = self.auto_pad in ("NOTSET", "VALID")
        self.begin, self.end = pads[:rank], pads[rank:]

    def resolve(self, spatial: Sequence[int]) -> Tuple[List[int], List[int]]:
        """(begin, end) pads for an input with these spatial sizes."""
        if self.static:
            return self.begin, self.end
        upper = self.auto_pad == "SAME_UPPER"
        pairs = [
            _same_pads(n, k, s, d, upper)
            for n, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations)
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def symmetric(self, limit: Optional[Sequence[float]] = None) -> Optional[List[int]]:
        """The per-axis padding when torch can apply it itself, else None."""
        if not self.static or self.begin != self.end:
            return None
        if limit is not None and any(p > bound for p, bound in zip(self.begin, limit)):
            return None
        return self.begin

    def apply(self, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """`x` padded explicitly (asymmetric or input-size dependent padding)."""
        begin, end = self.resolve(x.shape[2:])
        return F.pad(x, _torch_pad_list(begin, end), value=value)


def _torch_pad_list(begin: Sequence[int], end: Sequence[int]) -> List[int]:
    """ONNX (begin..., end...) for the last axes -> F.pad's last-axis-first pairs."""
    flat: List[int] = []
    for b, e in zip(reversed(list(begin)), reversed(list(end))):
        flat += [b, e]
    return flat


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _kernel_shape(info: NodeInfo) -> List[int]:
    """From the attribute, else (convolutions) from the weight's build-time shape."""
    if "kernel_shape" in info.attrs:
        return [int(k) for k in info.attrs["kernel_shape"]]
    weight = info.const(1)
    if weight is None:
        raise GdwsError(
            f"mirror: {info.node.op_type} node {info.name!r} has no kernel_shape and its "
            "weight is not an initializer"
        )
    return list(weight.shape[2:])


def _geometry(info: NodeInfo) -> Tuple[List[int], List[int], List[int]]:
    kernel = _kernel_shape(info)
    rank = len(kernel)
    strides = [int(s) for s in info.attrs.get("strides", [1] * rank)]
    dilations = [int(d) for d in info.attrs.get("dilations", [1] * rank)]
    return kernel, strides, dilations


class Conv:
    """ONNX Conv: any rank 1-3, group, strides, dilations, pads or auto_pad.

    Exposes its geometry and `patches` so per-sample weight gradients can be formed
    without re-deriving the padding (gdws_deploy.robustness.alphas).
    """

    def __init__(self, info: NodeInfo) -> None:
        self.kernel, self.strides, self.dilations = _geometry(info)
        self.group = int(info.attrs.get("group", 1))
        self.padding = SpatialPadding(info.attrs, self.kernel, self.strides, self.dilations)
        self.torch_padding = self.padding.symmetric()
        self.conv = _CONV[len(self.kernel)]

    def padded(self, x: torch.Tensor) -> Tuple[torch.Tensor, Union[List[int], int]]:
        if self.torch_padding is not None:
            return x, self.torch_padding
        return self.padding.apply(x), 0

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
        x, padding = self.padded(x)
        return self.conv(x, weight, bias, self.strides, padding, self.dilations, self.group)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C*kh*kw, L): the im2col matrix this 2-D conv multiplies."""
        x, padding = self.padded(x)
        return F.unfold(x, self.kernel, self.dilations, padding, self.strides)


@_op("Conv")
def _conv(info: NodeInfo) -> Compiled:
    return Conv(info)


@_op("ConvTranspose")
def _conv_transpose(info: NodeInfo) -> Compiled:
    kernel, strides, dilations = _geometry(info)
    rank = len(kernel)
    group = int(info.attrs.get("group", 1))
    extra = [int(p) for p in info.attrs.get("output_padding", [0] * rank)]
    padding = SpatialPadding(info.attrs, kernel, strides, dilations)
    output_shape = info.attrs.get("output_shape")
    transpose = _CONV_T[rank]
    symmetric = padding.symmetric() if output_shape is None else None
    if symmetric is not None and all(e < max(s, d) for e, s, d in zip(extra, strides, dilations)):
        return lambda x, w, b=None: transpose(x, w, b, strides, symmetric, extra, group, dilations)

    def pads_for(spatial: Sequence[int]) -> Tuple[List[int], List[int]]:
        if output_shape is None and padding.static:
            return padding.begin, padding.end
        full = [
            (n - 1) * s + (k - 1) * d + 1 for n, s, k, d in zip(spatial, strides, kernel, dilations)
        ]
        wanted = output_shape or [n * s for n, s in zip(spatial, strides)]
        totals = [f + e - int(o) for f, e, o in zip(full, extra, wanted[-rank:])]
        upper = padding.auto_pad == "SAME_UPPER"
        begin = [t // 2 if upper else t - t // 2 for t in totals]
        return begin, [t - b for t, b in zip(totals, begin)]

    def conv_transpose(x: torch.Tensor, w: torch.Tensor, b: Any = None) -> torch.Tensor:
        begin, end = pads_for(x.shape[2:])
        y = transpose(x, w, None, strides, 0, 0, group, dilations)
        y = F.pad(y, _torch_pad_list([-p for p in begin], [e - p for e, p in zip(extra, end)]))
        return y if b is None else y + b.reshape(1, -1, *([1] * rank))

    return conv_transpose


@_op("BatchNormalization")
def _batch_norm(info: NodeInfo) -> Compiled:
    eps = float(info.attrs.get("epsilon", 1e-5))

    def batch_norm(x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    return batch_norm


@_op("LRN")
def _lrn(info: NodeInfo) -> Compiled:
    """ONNX LRN: x / (bias + alpha/size * sum of x^2 over a window of channels)^beta.

    The window of channel c is [c - floor((size-1)/2), c + ceil((size-1)/2)]; torch's
    local_response_norm centres an even window the other way, so it is not used.
    """
    size = int(info.attrs["size"])
    alpha = float(info.attrs.get("alpha", 1e-4))
    beta = float(info.attrs.get("beta", 0.75))
    bias = float(info.attrs.get("bias", 1.0))
    before = (size - 1) // 2

    def lrn(x: torch.Tensor) -> torch.Tensor:
        squares = x.square().reshape(x.shape[0], 1, x.shape[1], -1)  # (N, 1, C, pixels)
        padded = F.pad(squares, (0, 0, before, size - 1 - before))
        mean = F.avg_pool2d(padded, (size, 1), stride=1).reshape(x.shape)
        return x / (bias + alpha * mean).pow(beta)

    return lrn


@_op("Gemm")
def _gemm(info: NodeInfo) -> Compiled:
    alpha = float(info.attrs.get("alpha", 1.0))
    beta = float(info.attrs.get("beta", 1.0))
    trans_a = int(info.attrs.get("transA", 0))
    trans_b = int(info.attrs.get("transB", 0))
    bias = info.const(2)
    plain = alpha == 1.0 and beta == 1.0 and not trans_a and trans_b
    if plain and (not info.has_input(2) or (bias is not None and bias.ndim == 1)):
        return F.linear

    def gemm(a: torch.Tensor, b: torch.Tensor, c: Any = None) -> torch.Tensor:
        y = torch.matmul(a.t() if trans_a else a, b.t() if trans_b else b)
        y = y * alpha if alpha != 1.0 else y
        return y if c is None else y + (c * beta if beta != 1.0 else c)

    return gemm


@_op("MatMul")
def _matmul(info: NodeInfo) -> Compiled:
    return torch.matmul


# ----------------------------------------------------------------------------------------
# Pooling


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("MaxPool")
def _max_pool(info: NodeInfo) -> Compiled:
    if len(info.node.output) > 1 and info.node.output[1]:
        raise GdwsError(f"mirror: MaxPool node {info.name!r} asks for Indices (unsupported)")
    kernel, strides, dilations = _geometry(info)
    ceil = bool(info.attrs.get("ceil_mode", 0))
    padding = SpatialPadding(info.attrs, kernel, strides, dilations)
    pool = _MAX_POOL[len(kernel)]
    limit = [((k - 1) * d + 1) / 2 for k, d in zip(kernel, dilations)]
    symmetric = padding.symmetric(limit)
    if symmetric is not None:
        return lambda x: pool(x, kernel, strides, symmetric, dilations, ceil)
    return lambda x: pool(padding.apply(x, -math.inf), kernel, strides, 0, dilations, ceil)


@_op("AveragePool")
def _average_pool(info: NodeInfo) -> Compiled:
    kernel, strides, dilations = _geometry(info)
    if any(d != 1 for d in dilations):
        raise GdwsError(f"mirror: AveragePool node {info.name!r} with dilations")
    ceil = bool(info.attrs.get("ceil_mode", 0))
    count_pad = bool(info.attrs.get("count_include_pad", 0))
    padding = SpatialPadding(info.attrs, kernel, strides, dilations)
    pool = _AVG_POOL[len(kernel)]
    symmetric = padding.symmetric([k / 2 for k in kernel])
    if symmetric is not None:
        return lambda x: pool(x, kernel, strides, symmetric, ceil, count_pad)

    def average_pool(x: torch.Tensor) -> torch.Tensor:
        total = pool(padding.apply(x), kernel, strides, 0, ceil, True)
        if count_pad:
            return total
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return total / pool(padding.apply(ones), kernel, strides, 0, ceil, True)

    return average_pool


@_op("GlobalAveragePool")
def _global_average_pool(info: NodeInfo) -> Compiled:
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(info: NodeInfo) -> Compiled:
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ----------------------------------------------------------------------------------------
# Shapes and indexing


@_op("Flatten")
def _flatten(info: NodeInfo) -> Compiled:
    axis = int(info.attrs.get("axis", 1))
    if axis == 1:
        return lambda x: x.reshape(x.shape[0], -1)
    return lambda x: x.reshape(math.prod(x.shape[: axis if axis >= 0 else axis + x.dim()]), -1)


@_op("Reshape", host=(1,))
def _reshape(info: NodeInfo) -> Compiled:
    allow_zero = bool(info.attrs.get("allowzero", 0))

    def target(x: torch.Tensor, shape: List[int]) -> List[int]:
        if allow_zero:
            return shape
        return [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]

    if info.const(1) is not None:
        shape = _int_list(info.const(1))
        if allow_zero or 0 not in shape:
            return lambda x, _: x.reshape(shape)
        return lambda x, _: x.reshape(target(x, shape))
    return lambda x, shape: x.reshape(target(x, _int_list(shape)))


@_op("Transpose")
def _transpose(info: NodeInfo) -> Compiled:
    perm = info.attrs.get("perm")
    if perm is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    perm = [int(p) for p in perm]
    return lambda x: x.permute(perm)


@_op("Concat")
def _concat(info: NodeInfo) -> Compiled:
    axis = int(info.attrs["axis"])
    return lambda *xs: torch.cat(xs, axis)


@_op("Squeeze", host=(1,))
def _squeeze(info: NodeInfo) -> Compiled:
    known, axes = info.attr_or_input("axes", 1)
    if known:
        if axes is None:
            return lambda x, *_: x.squeeze()
        return lambda x, *_: x.squeeze(tuple(axes))
    return lambda x, axes: x.squeeze(tuple(_int_list(axes)))


@_op("Unsqueeze", host=(1,))
def _unsqueeze(info: NodeInfo) -> Compiled:
    def unsqueeze(x: torch.Tensor, axes: List[int]) -> torch.Tensor:
        rank = x.dim() + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = x.unsqueeze(axis)
        return x

    known, axes = info.attr_or_input("axes", 1)
    if known:
        return lambda x, *_: unsqueeze(x, axes)
    return lambda x, axes: unsqueeze(x, _int_list(axes))


@_op("Gather")
def _gather(info: NodeInfo) -> Compiled:
    axis = int(info.attrs.get("axis", 0))
    indices = info.const(1)
    if indices is not None and indices.ndim == 0:
        position = int(indices)
        return lambda data, _: data.select(axis, position)
    if indices is not None and indices.ndim == 1 and (indices >= 0).all():
        return lambda data, index: torch.index_select(data, axis, index)

    def gather(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        dim = axis % data.dim()
        index = torch.where(index < 0, index + data.shape[dim], index)
        picked = torch.index_select(data, dim, index.reshape(-1))
        return picked.reshape(*data.shape[:dim], *index.shape, *data.shape[dim + 1 :])

    return gather


def _slice_tensor(
    x: Tensor,
    starts: List[int],
    ends: List[int],
    axes: Optional[List[int]] = None,
    steps: Optional[List[int]] = None,
) -> Tensor:
    """ONNX Slice semantics (clamping as Python's slices do, negative steps included)."""
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    key: List[Any] = [slice(None)] * x.dim()
    backwards = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        if step > 0:
            key[axis] = slice(start, end, step)
        else:  # torch slicing has no negative steps: pick the indices a range would
            backwards.append((axis, list(range(x.shape[axis])[slice(start, end, step)])))
    x = x[tuple(key)]
    for axis, picked in backwards:
        x = torch.index_select(x, axis, torch.tensor(picked, dtype=torch.long, device=x.device))
    return x


@_op("Slice", host=(1, 2, 3, 4))
def _slice(info: NodeInfo) -> Compiled:
    if info.opset < 10:
        fixed = [info.attrs.get(name) for name in ("starts", "ends", "axes")] + [None]
    elif all(info.known(i) for i in range(1, 5)):
        fixed = [info.const(i) for i in range(1, 5)]
    else:
        return lambda x, *args: _slice_tensor(x, *[_optional_ints(a) for a in args])
    starts, ends, axes, steps = [_optional_ints(v) for v in fixed]
    return lambda x, *_: _slice_tensor(x, starts, ends, axes, steps)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@_op("Pad", host=(1, 3))
def _pad(info: NodeInfo) -> Compiled:
    mode = info.attrs.get("mode", b"constant")
    mode = _PAD_MODES[mode.decode() if isinstance(mode, bytes) else mode]

    def pad(x: Tensor, pads: List[int], value: float, axes: Optional[List[int]]) -> Tensor:
        rank = x.dim()
        axes = [a % rank for a in axes] if axes is not None else list(range(rank))
        begin, end = [0] * rank, [0] * rank
        for i, axis in enumerate(axes):
            begin[axis], end[axis] = pads[i], pads[i + len(axes)]
        flat = _torch_pad_list(begin, end)
        while len(flat) > 2 and flat[-1] == 0 and flat[-2] == 0:  # untouched leading axes
            flat = flat[:-2]
        if mode == "constant":
            return F.pad(x, flat, mode, value)
        return F.pad(x, flat, mode)

    if info.opset < 11:
        pads = [int(p) for p in info.attrs["pads"]]
        value = float(info.attrs.get("value", 0.0))
        return lambda x: pad(x, pads, value, None)

    def value_of(constant: Any) -> float:
        return 0.0 if constant is None else float(constant.reshape(-1)[0])

    def run(x: Tensor, pads: Tensor, constant: Any = None, axes: Any = None) -> Tensor:
        axes = _int_list(axes) if axes is not None else None
        return pad(x, _int_list(pads), value_of(constant), axes)

    return run


@_op("Shape")
def _shape(info: NodeInfo) -> Compiled:
    start = info.attrs.get("start", 0)
    end = info.attrs.get("end")
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64)


@_op("Size")
def _size(info: NodeInfo) -> Compiled:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


@_op("ConstantOfShape", host=(0,))
def _constant_of_shape(info: NodeInfo) -> Compiled:
    value = info.attrs.get("value")
    fill = torch.from_numpy(value.copy()) if value is not None else torch.zeros(1)
    return lambda shape: fill.reshape(()).expand(_int_list(shape)).clone()


@_op("Expand", host=(1,))
def _expand(info: NodeInfo) -> Compiled:
    def expand(x: torch.Tensor, shape: Any) -> torch.Tensor:
        return x.expand(torch.broadcast_shapes(x.shape, tuple(_int_list(shape))))

    return expand


@_op("Range")
def _range(info: NodeInfo) -> Compiled:
    return lambda start, limit, delta: torch.arange(
        start.item(), limit.item(), delta.item(), dtype=start.dtype
    )


@_op("Constant")
def _constant(info: NodeInfo) -> Compiled:
    attrs = info.attrs
    if "value" in attrs:
        value = attrs["value"]
    elif "value_float" in attrs or "value_floats" in attrs:
        value = np.array(attrs.get("value_float", attrs.get("value_floats")), np.float32)
    elif "value_int" in attrs or "value_ints" in attrs:
        value = np.array(attrs.get("value_int", attrs.get("value_ints")), np.int64)
    else:
        raise GdwsError(f"mirror: Constant node {info.name!r} has an unsupported value kind")
    tensor = torch.from_numpy(np.array(value))
    return lambda: tensor


_REDUCE = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
}


@_op(*_REDUCE, host=(1,))
def _reduce(info: NodeInfo) -> Compiled:
    keep = bool(info.attrs.get("keepdims", 1))
    noop_empty = bool(info.attrs.get("noop_with_empty_axes", 0))
    reduce = _REDUCE[info.node.op_type]

    def run(x: torch.Tensor, axes: Optional[List[int]]) -> torch.Tensor:
        if not axes:
            if noop_empty:
                return x
            axes = list(range(x.dim()))
        return reduce(x, dim=tuple(axes), keepdim=keep)

    known, axes = info.attr_or_input("axes", 1)
    if known:
        return lambda x, *_: run(x, axes)
    return lambda x, axes: run(x, _int_list(axes))


# ----------------------------------------------------------------------------------------
# Quantization: the QuantizeLinear / DequantizeLinear pairs of a QDQ (INT8) model, opset 13+.
# A quantized tensor is carried as a float tensor of its integer values, so gradients reach
# through it; the types a QDQ model quantizes to, and their ranges (saturation):
_QUANTIZED_RANGES = {np.dtype(np.int8): (-128.0, 127.0), np.dtype(np.uint8): (0.0, 255.0)}


def _along(value: Tensor, axis: int, rank: int) -> Tensor:
    """A per-axis scale or zero point (1-D) shaped to broadcast along `axis` of a rank-`rank`
    tensor; a per-tensor one (a scalar) as it is."""
    if value.dim() == 0:
        return value
    return value.reshape(-1, *([1] * (rank - 1 - axis % rank)))


def _quantized_type(info: NodeInfo) -> np.dtype:
    """What QuantizeLinear quantizes to: output_dtype (opset 21), else its zero point's type,
    else uint8 (the spec's default)."""
    if info.attrs.get("block_size"):
        raise GdwsError(f"mirror: blocked quantization in node {info.name!r} is not supported")
    if info.attrs.get("output_dtype"):
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(info.attrs["output_dtype"])))
    elif info.has_input(2):
        zero_point = info.const(2)
        if zero_point is None:
            raise GdwsError(f"mirror: the zero point of node {info.name!r} is not a constant")
        dtype = zero_point.dtype
    else:
        dtype = np.dtype(np.uint8)
    if dtype not in _QUANTIZED_RANGES:
        raise GdwsError(f"mirror: node {info.name!r} quantizes to {dtype}: int8 and uint8 only")
    return dtype


@_op("QuantizeLinear")
def _quantize_linear(info: NodeInfo) -> Compiled:
    """saturate(round(x / scale) + zero_point), rounding half to even as onnxruntime does.

    Straight-through gradient: the rounding passes the gradient as the identity, the
    saturation passes it where the rounded value lies in [qmin, qmax] and stops it where it
    is clipped. Rounding's true gradient
    is zero almost everywhere, which would blind every gradient attack (and overstate the
    INT8 model's robustness); saturation's true gradient is zero outside the range, where
    moving the input changes nothing.
    """
    low, high = _QUANTIZED_RANGES[_quantized_type(info)]
    axis = int(info.attrs.get("axis", 1))

    def quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None) -> Tensor:
        scaled = x / _along(scale, axis, x.dim())
        rounded = scaled + (torch.round(scaled) - scaled).detach()
        if zero_point is not None:
            rounded = rounded + _along(zero_point.to(rounded.dtype), axis, x.dim())
        return torch.clamp(rounded, low, high)

    return quantize


@_op("DequantizeLinear")
def _dequantize_linear(info: NodeInfo) -> Compiled:
    """(x - zero_point) * scale in the scale's float type; x is an integer initializer (a
    quantized weight or bias) or a QuantizeLinear output the mirror carries as float."""
    if info.attrs.get("block_size"):
        raise GdwsError(f"mirror: blocked quantization in node {info.name!r} is not supported")
    axis = int(info.attrs.get("axis", 1))

    def dequantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None) -> Tensor:
        values = x.to(scale.dtype)
        if zero_point is not None:
            values = values - _along(zero_point.to(scale.dtype), axis, x.dim())
        return values * _along(scale, axis, x.dim())

    return dequantize


# ----------------------------------------------------------------------------------------
# Control flow


def _captured(node: onnx.NodeProto) -> List[str]:
    """Outer tensors the node's subgraphs read, in order of first use (ONNX lets a
    subgraph name any tensor of the enclosing scopes)."""
    names: List[str] = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            names += _free_names(attribute.g)
    return list(dict.fromkeys(names))


def _free_names(graph: onnx.GraphProto) -> List[str]:
    local = {value.name for value in graph.input} | {t.name for t in graph.initializer}
    free = []
    for node in graph.node:
        free += [name for name in [*node.input, *_captured(node)] if name and name not in local]
        local.update(node.output)
    free += [output.name for output in graph.output if output.name not in local]
    return free


def _branch(graph: onnx.GraphProto, info: NodeInfo) -> OnnxMirror:
    """A subgraph as a mirror of its own whose inputs are the outer tensors it reads, their
    build-time values (outer constants and parameters) known to its op compilers."""
    captured = _captured(info.node)
    known = zip(captured, info.consts[len(info.node.input) :])
    branch = onnx.GraphProto()
    branch.CopyFrom(graph)
    del branch.input[:]
    branch.input.extend(helper.make_empty_tensor_value_info(name) for name in captured)
    model = helper.make_model(branch, opset_imports=[helper.make_opsetid("", info.opset)])
    return OnnxMirror(model, {name: value for name, value in known if value is not None})


class If(nn.Module):
    """ONNX If, e.g. the squeeze-if-the-dim-is-1 of torch exports: the branch the condition
    picks runs at forward time; both are submodules, so their tensors move with the mirror."""

    def __init__(self, info: NodeInfo) -> None:
        super().__init__()
        self.then_branch = _branch(info.attrs["then_branch"], info)
        self.else_branch = _branch(info.attrs["else_branch"], info)

    def forward(self, condition: torch.Tensor, *captured: torch.Tensor) -> Any:
        return (self.then_branch if bool(condition) else self.else_branch)(*captured)


@_op("If")
def _if(info: NodeInfo) -> Compiled:
    return If(info)


# ----------------------------------------------------------------------------------------
# Building the module


def _attributes(node: onnx.NodeProto) -> Dict[str, Any]:
    attrs = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        attrs[attribute.name] = (
            _promoted(numpy_helper.to_array(value))
            if isinstance(value, onnx.TensorProto)
            else value
        )
    return attrs


def _to_tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(value, copy=True))


def _to_device_of(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return value.to(reference.device)


def _declared_shape(info: onnx.ValueInfoProto) -> Tuple[Union[int, str, None], ...]:
    """Dims as declared: ints where fixed, names or None where not."""
    dims = info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _running_statistics(graph: onnx.GraphProto) -> set:
    """Initializers read only as BatchNormalization mean/var: buffers, not parameters."""
    statistics, other = set(), set()
    for node in graph.node:
        for index, name in enumerate(node.input):
            is_stat = node.op_type == "BatchNormalization" and index in (3, 4)
            (statistics if is_stat else other).add(name)
    return statistics - other


class OnnxMirror(nn.Module):
    """An ONNX graph as a torch module: same outputs as onnxruntime, plus gradients.

    `onnx_names[torch_name]` and `torch_names[onnx_name]` map initializer names both ways;
    `tensor(onnx_name)` returns the parameter or buffer; `compiled(node)` the callable
    a node became (a `Conv` for Conv nodes).
    """

    def __init__(
        self, model: onnx.ModelProto, known_inputs: Optional[Dict[str, np.ndarray]] = None
    ) -> None:
        """known_inputs: build-time values of graph inputs (a subgraph's outer constants and
        parameters), which op compilers may read as they read initializers'; the inputs are
        still fed at every forward."""
        super().__init__()
        self.onnx_names: Dict[str, str] = {}
        self.torch_names: Dict[str, str] = {}
        self._recording: Optional[Tuple[set, dict]] = None
        self.input_shapes: List[Tuple[Union[int, str, None], ...]] = []  # declared, per input
        _Builder(self, model, known_inputs or {}).build()

    def tensor(self, onnx_name: str) -> torch.Tensor:
        return getattr(self, self.torch_names[onnx_name])

    def compiled(self, name: str) -> Compiled:
        return self._compiled[name]

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self._run(inputs, self._recording)

    @contextlib.contextmanager
    def recording(self, nodes: Sequence[str]) -> Iterator[Dict[str, Tuple[tuple, tuple]]]:
        """While active, each forward also fills {node: (its inputs, its outputs)}.

        Works through wrappers (normalization, attacks) since it lives on the module.
        """
        missing = set(nodes) - set(self._step_names)
        if missing:
            raise GdwsError(f"mirror: no runtime node named {sorted(missing)[0]!r}")
        records: Dict[str, Tuple[tuple, tuple]] = {}
        self._recording = (set(nodes), records)
        try:
            yield records
        finally:
            self._recording = None

    def _run(self, inputs: Tuple[torch.Tensor, ...], recording: Any) -> Any:
        if len(inputs) != len(self._input_slots):
            raise GdwsError(
                f"mirror: the model takes {len(self._input_slots)} input(s), got {len(inputs)}"
            )
        env = list(self._template)
        for slot, name in self._tensor_slots:
            env[slot] = getattr(self, name)
        for slot, value in zip(self._input_slots, inputs):
            env[slot] = value.float() if value.dtype == torch.float16 else value
        for name, (fn, ins, outs, frees) in zip(self._step_names, self._steps):
            result = fn(*[env[i] for i in ins])
            if len(outs) == 1:
                env[outs[0]] = result
                result = (result,)
            else:
                for slot, value in zip(outs, result):
                    env[slot] = value
            if recording is not None and name in recording[0]:
                recording[1][name] = (tuple(env[i] for i in ins), tuple(result))
            for slot in frees:
                env[slot] = None
        outputs = tuple(env[slot] for slot in self._output_slots)
        return outputs[0] if len(outputs) == 1 else outputs


class _Builder:
    """Compiles the graph into OnnxMirror's slot table and step list."""

    def __init__(
        self, mirror: OnnxMirror, model: onnx.ModelProto, known_inputs: Dict[str, np.ndarray]
    ) -> None:
        self.mirror = mirror
        self.graph = model.graph
        self.opset = _opset(model)
        self.kinds: Dict[str, str] = {}
        # build-time values (CONST and PARAM, and inputs known in advance)
        self.values: Dict[str, np.ndarray] = dict(known_inputs)
        self.data_slots: Dict[str, int] = {}  # where a tensor lives at runtime on the device
        self.host_slots: Dict[str, int] = {}  # build-time constants as CPU tensors
        self.moved_slots: Dict[str, int] = {}
        self.template: List[Any] = [None]
        self.tensor_slots: List[Tuple[int, str]] = []
        self.steps: List[Tuple[Compiled, Tuple[int, ...], Tuple[int, ...]]] = []
        self.step_names: List[str] = []
        self.compiled: Dict[str, Compiled] = {}

    def new_slot(self, value: Any = None) -> int:
        self.template.append(value)
        return len(self.template) - 1

    def torch_name(self, onnx_name: str, prefix: str = "") -> str:
        """`prefix + onnx_name` as a new attribute name of the mirror."""
        torch_name = re.sub(r"\W", "_", prefix + onnx_name)
        if not torch_name or torch_name[0].isdigit():
            torch_name = f"t_{torch_name}"
        base, suffix = torch_name, 1
        while hasattr(self.mirror, torch_name):
            torch_name, suffix = f"{base}_{suffix}", suffix + 1
        return torch_name

    def register(self, onnx_name: str, value: np.ndarray, kind: str, prefix: str = "") -> int:
        """A parameter or buffer named after `onnx_name`, read into a slot every forward."""
        torch_name = self.torch_name(onnx_name, prefix)
        tensor = _to_tensor(value)
        if kind == PARAM:
            self.mirror.register_parameter(torch_name, nn.Parameter(tensor))
        else:
            self.mirror.register_buffer(torch_name, tensor)
        self.mirror.onnx_names[torch_name] = onnx_name
        self.mirror.torch_names[onnx_name] = torch_name
        slot = self.new_slot()
        self.tensor_slots.append((slot, torch_name))
        self.data_slots[onnx_name] = slot
        return slot

    def build(self) -> None:
        statistics = _running_statistics(self.graph)
        for initializer in self.graph.initializer:
            value = _promoted(numpy_helper.to_array(initializer))
            floating = value.dtype.kind == "f" and initializer.name not in statistics
            self.kinds[initializer.name] = PARAM if floating else CONST
            self.values[initializer.name] = value
            self.register(initializer.name, value, PARAM if floating else "buffer")
        input_slots = []
        for graph_input in self.graph.input:
            if graph_input.name not in self.kinds:
                self.mirror.input_shapes.append(_declared_shape(graph_input))
                self.kinds[graph_input.name] = DATA
                self.data_slots[graph_input.name] = self.new_slot()
                input_slots.append(self.data_slots[graph_input.name])
        for index, node in enumerate(self.graph.node):
            self.add_node(node, node_name(node, index))
        outputs = [self.output_slot(output.name) for output in self.graph.output]
        self.finish(input_slots, outputs)

    def output_slot(self, name: str) -> int:
        if name not in self.kinds:
            raise GdwsError(f"mirror: graph output {name!r} is never produced")
        return self.input_slot(name, DATA, host=self.kinds[name] == SHAPE, reference=None)

    def add_node(self, node: onnx.NodeProto, step_name: str) -> None:
        label = f"{node.op_type} node {step_name!r}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
            raise GdwsError(f"mirror: unsupported op {node.op_type} in node {step_name!r}")
        inputs = [*node.input, *_captured(node)]  # a subgraph's outer reads come last
        for tensor in inputs:
            if tensor and tensor not in self.kinds:
                raise GdwsError(f"mirror: {label} reads {tensor!r}, which nothing produces before")
        consts = [self.values.get(tensor) for tensor in inputs]
        info = NodeInfo(node, step_name, _attributes(node), consts, self.opset)
        fn = _OPS[node.op_type](info)
        kinds = {self.kinds[tensor] for tensor in inputs if tensor}
        if kinds <= {CONST}:
            self.fold(inputs, node.output, fn)
            return
        if isinstance(fn, nn.Module):
            self.mirror.add_module(self.torch_name(step_name, "node_"), fn)
        if node.op_type in ("Shape", "Size"):
            kind = SHAPE
        else:
            kind = DATA if kinds & {DATA, PARAM} else SHAPE
        host = _HOST_INPUTS[node.op_type]
        reference = next(
            (self.data_slots[t] for t in inputs if t and self.kinds[t] in (DATA, PARAM)), None
        )
        slots = tuple(
            self.input_slot(tensor, kind, i in host, reference) for i, tensor in enumerate(inputs)
        )
        outs = []
        for tensor in node.output:
            self.kinds[tensor] = kind
            slot = self.new_slot()
            (self.host_slots if kind == SHAPE else self.data_slots)[tensor] = slot
            outs.append(slot)
        self.add_step(step_name, fn, slots, tuple(outs))
        self.compiled[step_name] = fn

    def add_step(self, name: str, fn: Compiled, ins: Tuple[int, ...], outs: Tuple[int, ...]):
        self.steps.append((fn, ins, outs))
        self.step_names.append(name)

    def input_slot(self, name: str, kind: str, host: bool, reference: Optional[int]) -> int:
        """The slot a node of `kind` reads tensor `name` from, moving it where needed.

        An omitted optional input (empty name) reads slot 0, which always holds None.
        """
        if not name:
            return 0
        source = self.kinds[name]
        if source == CONST and (host or kind == SHAPE):
            if name not in self.host_slots:
                self.host_slots[name] = self.new_slot(_to_tensor(self.values[name]))
            return self.host_slots[name]
        if source == CONST:
            if name not in self.data_slots:
                self.register(name, self.values[name], "buffer", prefix="const_")
            return self.data_slots[name]
        if source == SHAPE:
            if host or kind == SHAPE or reference is None:
                return self.host_slots[name]
            if name not in self.moved_slots:  # shape values meeting data go to its device
                self.moved_slots[name] = self.new_slot()
                ins = (self.host_slots[name], reference)
                self.add_step(f"to_device:{name}", _to_device_of, ins, (self.moved_slots[name],))
            return self.moved_slots[name]
        return self.data_slots[name]

    def fold(self, inputs: Sequence[str], outputs: Sequence[str], fn: Compiled) -> None:
        args = [_to_tensor(self.values[name]) if name else None for name in inputs]
        with torch.no_grad():
            result = fn(*args)
        results = result if isinstance(result, tuple) else (result,)
        for name, value in zip(outputs, results):
            self.kinds[name] = CONST
            self.values[name] = value.detach().cpu().numpy()

    def finish(self, input_slots: List[int], output_slots: List[int]) -> None:
        last_use: Dict[int, int] = {}
        for index, (_, ins, _) in enumerate(self.steps):
            for slot in ins:
                last_use[slot] = index
        keep = set(output_slots) | {0}
        frees: List[List[int]] = [[] for _ in self.steps]
        for slot, index in last_use.items():
            if slot not in keep:
                frees[index].append(slot)
        mirror = self.mirror
        mirror._template = tuple(self.template)
        mirror._tensor_slots = tuple(self.tensor_slots)
        mirror._input_slots = tuple(input_slots)
        mirror._output_slots = tuple(output_slots)
        mirror._steps = tuple(
            (fn, ins, outs, tuple(f)) for (fn, ins, outs), f in zip(self.steps, frees)
        )
        mirror._step_names = tuple(self.step_names)
        mirror._compiled = self.compiled


def load_mirror(source: Union[str, Path, onnx.ModelProto]) -> OnnxMirror:
    """Build the mirror of an ONNX file (external data included) or ModelProto."""
    model = source if isinstance(source, onnx.ModelProto) else load_model(source).model
    return OnnxMirror(model)
