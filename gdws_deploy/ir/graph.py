"""ONNX in and out: load and check models, find the convs a pass may rewrite, count MACs.

The checker and shape inference run on a *skeleton* of the model, whose large float
weights are declared as typed graph inputs instead of carried: both are C++ passes that
serialize the whole model, which for a 50 MB network costs as loading it (see
benchmarks/convert_speed.py). The weights left out are checked here for their size.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, numpy_helper

from gdws_deploy.atomic import atomic_path, check_output_path
from gdws_deploy.errors import GdwsError

Dim = Union[int, str, None]
Shape = Tuple[Dim, ...]

# Initializers of these types and at least this size go into the skeleton as inputs.
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_SKELETON_MIN_BYTES = 1024
_EXTERNAL_MIN_BYTES = 1024
# The first IR version whose initializers need not be listed as graph inputs.
_PRIVATE_INITIALIZERS_IR = 4


@dataclass(frozen=True)
class LoadedModel:
    """A checked model and where its weights came from (to save it the same way)."""

    model: onnx.ModelProto
    path: Optional[Path] = None
    external_files: Tuple[Path, ...] = ()

    @property
    def external_data(self) -> bool:
        return bool(self.external_files)


@dataclass(frozen=True)
class TensorType:
    """Element type (onnx.TensorProto enum) and shape, None where unknown."""

    elem_type: int
    shape: Optional[Shape]


@dataclass(frozen=True)
class ConvLayer:
    """One Conv node: its weight when a pass may rewrite it, else why not.

    index: position in model.graph.node; pixels: output H_out * W_out at batch 1;
    group: its group attribute; weight_type: the onnx.TensorProto type of its weight when
    that is a constant (None: computed or fed at run time). A compression pass reads
    these to say which of the selected Convs it can take (passes.base).
    """

    index: int
    name: str
    weight_shape: Tuple[int, ...]
    macs: int
    pixels: int = 0
    weight: Optional[np.ndarray] = None
    skipped: Optional[str] = None
    group: int = 1
    weight_type: Optional[int] = None

    @property
    def eligible(self) -> bool:
        return self.skipped is None

    @property
    def kernel_macs(self) -> int:
        """MACs of one GDWS kernel: its depthwise kernel and pointwise column, at every
        output pixel (batch 1)."""
        out_channels, _, kh, kw = self.weight_shape
        return (kh * kw + out_channels) * self.pixels


def load_model(path: Union[str, Path]) -> LoadedModel:
    """Read an ONNX file with its external data; GdwsError if it is not a valid model."""
    source = Path(path)
    if not source.exists():
        raise GdwsError(f"{source} does not exist")
    if not source.is_file():
        raise GdwsError(f"{source} is not a file")
    if source.stat().st_size == 0:
        raise GdwsError(f"{source} is empty")
    try:
        model = onnx.load(str(source), load_external_data=False)
    except (DecodeError, OSError, ValueError) as error:
        raise GdwsError(f"{source} is not a readable ONNX model ({error})") from error
    external = sorted(
        {
            source.parent / external_data_helper.ExternalDataInfo(t).location
            for t in _external(model)
        }
    )
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(source.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise GdwsError(f"cannot read the external data of {source}: {error}") from error
    return LoadedModel(model, source, tuple(external))


def check_and_infer(model: onnx.ModelProto) -> Dict[str, TensorType]:
    """Run onnx.checker on `model` and infer the type and shape of every tensor.

    GdwsError when the checker rejects the model (or weight data are missing). The model
    is checked at rewritten_ir_version: an IR-3 model whose initializers are not graph
    inputs passes, as its rewrite will be valid.
    """
    if any(True for _ in _external(model)):
        raise GdwsError("the model's external data is not loaded; pass the model's path instead")
    for tensor in model.graph.initializer:
        if tensor.data_type in _FLOAT_TYPES:
            _check_tensor_size(tensor)
    skeleton = _skeleton(model)
    skeleton.ir_version = rewritten_ir_version(model)  # checked as it will be written
    try:
        onnx.checker.check_model(skeleton)
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise GdwsError(f"the model fails onnx.checker: {_one_line(error)}") from error
    graph = inferred.graph
    types = {
        info.name: _tensor_type(info.type)
        for info in [*graph.input, *graph.value_info, *graph.output]
        if info.type.HasField("tensor_type")
    }
    for tensor in graph.initializer:
        types[tensor.name] = TensorType(tensor.data_type, tuple(tensor.dims))
    return types


def verify(model: onnx.ModelProto) -> None:
    """onnx.checker on a model this tool built; it raises only on a bug of the tool.

    The same check as for inputs: a model may pass it and yet fail strict shape
    inference, and that is no fault of the rewrite.
    """
    onnx.checker.check_model(_skeleton(model))


def adopt_model_fields(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Give `model` every field of `original` but the graph: opsets, metadata, and its
    IR version as rewritten_ir_version says."""
    for field, _ in model.ListFields():
        if field.name != "graph":
            model.ClearField(field.name)
    _copy_fields(original, model, skip="graph")
    model.ir_version = rewritten_ir_version(original)
    return model


def rewritten_ir_version(model: onnx.ModelProto) -> int:
    """The IR version a rewrite of `model` is written at: its own, from IR 4 on.

    Below IR 4 every initializer must also be a graph input, and rewritten layers add
    initializers; such a model comes out at the IR onnx.helper makes for its opsets, at
    least 4 (nothing else differs between those IR versions for these models).
    """
    if model.ir_version >= _PRIVATE_INITIALIZERS_IR:
        return model.ir_version
    made = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return max(_PRIVATE_INITIALIZERS_IR, made)


def save_model(
    model: onnx.ModelProto, path: Union[str, Path], like: Optional[LoadedModel] = None
) -> Path:
    """Write `model` atomically, stored the way `like` was: with its large weights in
    `<path>.data` when `like` kept them in external data. Never overwrites `like`'s files.
    """
    sources = (like.path, *like.external_files) if like and like.path else ()
    out = check_output_path(path, *sources)
    try:
        if like is not None and like.external_data:
            _save_with_external_data(model, out, sources)
        else:
            with atomic_path(out) as tmp:
                tmp.write_bytes(model.SerializeToString())
    except OSError as error:
        raise GdwsError(f"cannot write {out}: {error.strerror or error}") from error
    except ValueError as error:  # protobuf refuses messages over 2 GB
        raise GdwsError(f"cannot write {out}: {error}") from error
    return out


def external_data_path(path: Union[str, Path]) -> Path:
    """Where save_model(..., external_data=True) puts the weights of `path`."""
    out = Path(path)
    return out.with_name(out.name + ".data")


def find_convs(
    model: onnx.ModelProto,
    types: Dict[str, TensorType],
    macs: Dict[int, int],
    all_layers: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> List[ConvLayer]:
    """Every Conv node in graph order, with its weight if eligible or the reason it is not.

    macs: per-node MACs from count_macs. Eligible: a constant weight and inferred shapes,
    not the first conv unless `all_layers`, its name matching an `include` glob (when any)
    and no `exclude` glob. What a pass can rewrite besides is the pass's to say
    (CompressionPass.why_not).
    """
    weights = _constant_weights(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    graph_inputs = {info.name for info in model.graph.input}
    layers = []
    first = True
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = node_name(node, index)
        weight_name = node.input[1]
        weight_shape = tuple(
            d if isinstance(d, int) else -1 for d in _shape_of(types.get(weight_name))
        )
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        weight_type = None
        if weight_name in graph_inputs:
            reason = "weight is a graph input (not a constant)"
        elif weight_name in weights:
            reason, weight_type = None, weights[weight_name].data_type
        elif weight_name in producers and producers[weight_name].op_type == "DequantizeLinear":
            reason = "quantized weight (DequantizeLinear)"
        else:
            producer = producers.get(weight_name)
            reason = f"weight computed at run time by {producer.op_type if producer else '?'}"
        output_shape = _shape_of(types.get(node.output[0]))
        if reason is None and (len(output_shape) != 4 or index not in macs):
            reason = "shapes could not be inferred"
        reason = reason or _selection_reason(name, first, all_layers, include, exclude)
        first = False
        if reason is not None:
            layers.append(
                ConvLayer(
                    index,
                    name,
                    weight_shape,
                    macs.get(index, 0),
                    skipped=reason,
                    group=group,
                    weight_type=weight_type,
                )
            )
            continue
        pixels = _batch1_numel(output_shape[2:])
        weight = numpy_helper.to_array(weights[weight_name])
        layers.append(
            ConvLayer(
                index, name, weight.shape, macs[index], pixels, weight, None, group, weight_type
            )
        )
    return layers


def count_macs(model: onnx.ModelProto, types: Dict[str, TensorType]) -> Dict[int, int]:
    """Multiply-accumulates per node (Conv, ConvTranspose, Gemm, MatMul) at batch 1.

    Keyed by node index; the first dimension counts as the batch, and dimensions that
    are not fixed numbers count as 1. Nodes whose shapes are unknown are left out.
    """
    macs = {}
    for index, node in enumerate(model.graph.node):
        counter = _MAC_COUNTERS.get(node.op_type)
        if counter is None:
            continue
        shapes = [_shape_of(types.get(name)) for name in [*node.input[:2], node.output[0]]]
        if all(shapes):
            macs[index] = int(counter(node, *shapes))
    return macs


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable stand-in for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"


def _conv_macs(node: onnx.NodeProto, x: Shape, w: Shape, y: Shape) -> int:
    return _batch1_numel(y[1:]) * _batch1_numel(w[1:])


def _conv_transpose_macs(node: onnx.NodeProto, x: Shape, w: Shape, y: Shape) -> int:
    return _batch1_numel(x[1:]) * _batch1_numel(w[1:])


def _gemm_macs(node: onnx.NodeProto, a: Shape, b: Shape, y: Shape) -> int:
    trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
    inner = a[0] if trans_a else a[-1]
    return _batch1_numel(y[1:]) * _batch1_numel((inner,))


def _matmul_macs(node: onnx.NodeProto, a: Shape, b: Shape, y: Shape) -> int:
    return _batch1_numel(y[1:]) * _batch1_numel(a[-1:])


_MAC_COUNTERS = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
}


def _selection_reason(
    name: str, first: bool, all_layers: bool, include: Sequence[str], exclude: Sequence[str]
) -> Optional[str]:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
        return "excluded by --exclude"
    if include and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
        return "not matched by --include"
    if first and not all_layers:
        return "first conv (kept dense; --all-layers converts it)"
    return None


def _external(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """The tensors of `model` (subgraphs included) whose data live in external files."""
    return (t for t in graph_tensors(model.graph) if external_data_helper.uses_external_data(t))


def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Initializers and attribute tensors of `graph` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for subgraph in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from graph_tensors(subgraph)


def _constant_weights(model: onnx.ModelProto) -> Dict[str, TensorProto]:
    """Constant tensors by name: initializers and the `value` of Constant nodes."""
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    return constants


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its large float initializers declared as typed inputs, data left out."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    declared = {info.name for info in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES or _nbytes(tensor) < _SKELETON_MIN_BYTES:
            skeleton.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            skeleton.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return skeleton


def _nbytes(tensor: TensorProto) -> int:
    """Size of the tensor's data as its dims and type declare it (not reading the data)."""
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _check_tensor_size(tensor: TensorProto) -> None:
    """What onnx.checker says about an initializer's data length, for those the skeleton
    leaves out."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.HasField("raw_data"):
        stored, needed = len(tensor.raw_data), _nbytes(tensor)
    else:
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        stored, needed = len(getattr(tensor, field)), count
    if stored < needed:
        raise GdwsError(
            f"the model fails onnx.checker: initializer {tensor.name!r} holds {stored} "
            f"values/bytes where its shape needs {needed} (truncated file?)"
        )


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set protobuf field of `source` into `target` except `skip`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        current = getattr(target, field.name)
        if hasattr(current, "MergeFrom"):
            current.MergeFrom(value)
        else:
            setattr(target, field.name, value)


def _save_with_external_data(model: onnx.ModelProto, out: Path, sources: Sequence[Path]) -> None:
    """Write the model and `<out>.data` atomically, weights appended one after another."""
    data_path = check_output_path(external_data_path(out), *sources)
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    with atomic_path(out) as tmp_model, atomic_path(data_path) as tmp_data:
        with open(tmp_data, "wb") as data:
            for tensor in staged.graph.initializer:
                if not tensor.HasField("raw_data") or _nbytes(tensor) < _EXTERNAL_MIN_BYTES:
                    continue
                offset = data.tell()
                data.write(tensor.raw_data)
                external_data_helper.set_external_data(
                    tensor, data_path.name, offset, data.tell() - offset
                )
                tensor.ClearField("raw_data")
        tmp_model.write_bytes(staged.SerializeToString())


def _tensor_type(proto: onnx.TypeProto) -> TensorType:
    tensor = proto.tensor_type
    if not tensor.HasField("shape"):
        return TensorType(tensor.elem_type, None)
    dims = tuple(_dim(d) for d in tensor.shape.dim)
    return TensorType(tensor.elem_type, dims)


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return dim.dim_value
    if dim.HasField("dim_param"):
        return dim.dim_param
    return None


def _shape_of(tensor_type: Optional[TensorType]) -> Shape:
    if tensor_type is None or tensor_type.shape is None:
        return ()
    return tensor_type.shape


def _batch1_numel(dims: Sequence[Dim]) -> int:
    """Product of the dims, those not fixed (symbolic or unknown) counting as 1."""
    return int(np.prod([d if isinstance(d, int) else 1 for d in dims], dtype=np.int64))


def _one_line(error: Exception) -> str:
    """The whole message on one line: onnx's often names the node only on its later lines."""
    return " ".join(str(error).split()) or type(error).__name__
