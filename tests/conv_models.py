"""Small real ONNX models for the convert tests, built with onnx.helper.

`conv_chain` stacks Conv -> Relu layers described by ConvSpec. Weights are "random"
(full rank), "rankR" (each input channel's (M, kh*kw) matrix of rank R) or "sparse":
only every third input channel is nonzero. Zero channels have exactly zero singular
values, so LEGO at beta = 0 drops them and the layer is rewritten exactly with fewer
MACs, which a full-rank layer never allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT = "images"
OUTPUT = "scores"


@dataclass(frozen=True)
class ConvSpec:
    """One Conv layer; source says where its weight comes from."""

    out: int
    kernel: Tuple[int, int] = (3, 3)
    strides: Optional[Tuple[int, int]] = None
    pads: Optional[Tuple[int, int, int, int]] = None
    auto_pad: Optional[str] = None
    dilations: Optional[Tuple[int, int]] = None
    group: int = 1
    bias: bool = True
    source: str = "initializer"  # initializer | constant | dequantize | input
    weights: str = "sparse"  # sparse | random | rank1 | rank2 ...
    name: Optional[str] = None


def conv_weight(shape: Sequence[int], kind: str, rng: np.random.Generator) -> np.ndarray:
    """A float32 (M, C, kh, kw) weight of the given kind (see the module docstring)."""
    m, c, kh, kw = shape
    weight = rng.standard_normal(shape).astype(np.float32)
    if kind == "sparse":
        weight[:, np.arange(c) % 3 != 0] = 0
    elif kind.startswith("rank"):
        rank = int(kind[len("rank") :])
        columns = rng.standard_normal((c, m, rank))
        kernels = rng.standard_normal((c, rank, kh * kw))
        weight = (columns @ kernels).transpose(1, 0, 2).reshape(shape).astype(np.float32)
    return weight


def conv_chain(
    specs: Sequence[ConvSpec],
    input_shape: Tuple[int, int, int] = (4, 12, 12),
    seed: int = 0,
    dense_head: bool = False,
    opset: int = OPSET,
) -> onnx.ModelProto:
    """images (batch, C, H, W) -> [Conv -> Relu]* -> [Flatten -> Gemm] -> scores."""
    rng = np.random.default_rng(seed)
    nodes, initializers, inputs = [], [], []
    current, channels = INPUT, input_shape[0]
    for index, spec in enumerate(specs):
        name = spec.name or f"conv{index}"
        shape = (spec.out, channels // spec.group, *spec.kernel)
        weight = conv_weight(shape, spec.weights, rng)
        weight_name = f"{name}.weight"
        nodes += _weight_nodes(spec, name, weight_name, weight, initializers, inputs)
        conv_inputs = [current, weight_name]
        if spec.bias:
            bias = rng.standard_normal(spec.out).astype(np.float32)
            initializers.append(numpy_helper.from_array(bias, f"{name}.bias"))
            conv_inputs.append(f"{name}.bias")
        attrs = {
            key: value
            for key, value in {
                "kernel_shape": list(spec.kernel),
                "strides": spec.strides and list(spec.strides),
                "pads": spec.pads and list(spec.pads),
                "auto_pad": spec.auto_pad,
                "dilations": spec.dilations and list(spec.dilations),
                "group": spec.group if spec.group != 1 else None,
            }.items()
            if value is not None
        }
        nodes.append(helper.make_node("Conv", conv_inputs, [f"{name}.out"], name=name, **attrs))
        nodes.append(
            helper.make_node("Relu", [f"{name}.out"], [f"{name}.act"], name=f"{name}.relu")
        )
        current, channels = f"{name}.act", spec.out
    if dense_head:
        head = rng.standard_normal((10, channels)).astype(np.float32)
        initializers.append(numpy_helper.from_array(head, "head.weight"))
        nodes.append(helper.make_node("ReduceMean", [current], ["pooled"], axes=[2, 3], keepdims=0))
        nodes.append(helper.make_node("Gemm", ["pooled", "head.weight"], [OUTPUT], transB=1))
        output_shape = ["batch", 10]
    else:
        nodes.append(helper.make_node("Identity", [current], [OUTPUT], name="output"))
        output_shape = ["batch", channels, None, None]
    graph = helper.make_graph(
        nodes,
        "conv_chain",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *input_shape]), *inputs],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, output_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model.producer_name = "gdws-tests"
    helper.set_model_props(model, {"author": "tests", "purpose": "fixture"})
    onnx.checker.check_model(model, full_check=True)
    return model


def _weight_nodes(
    spec: ConvSpec,
    name: str,
    weight_name: str,
    weight: np.ndarray,
    initializers: list,
    inputs: list,
) -> list:
    """Make `weight_name` available the way spec.source says; return the nodes it needs."""
    if spec.source == "initializer":
        initializers.append(numpy_helper.from_array(weight, weight_name))
        return []
    if spec.source == "constant":
        tensor = numpy_helper.from_array(weight, f"{weight_name}.value")
        return [helper.make_node("Constant", [], [weight_name], name=f"{name}.w", value=tensor)]
    if spec.source == "input":
        inputs.append(helper.make_tensor_value_info(weight_name, TensorProto.FLOAT, weight.shape))
        return []
    if spec.source == "dequantize":
        scale = np.float32(np.abs(weight).max() / 127 or 1.0)
        quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        initializers.append(numpy_helper.from_array(quantized, f"{weight_name}.q"))
        initializers.append(numpy_helper.from_array(np.array(scale), f"{weight_name}.scale"))
        initializers.append(numpy_helper.from_array(np.array(0, np.int8), f"{weight_name}.zp"))
        dq_inputs = [f"{weight_name}.q", f"{weight_name}.scale", f"{weight_name}.zp"]
        return [helper.make_node("DequantizeLinear", dq_inputs, [weight_name], name=f"{name}.dq")]
    raise ValueError(f"unknown weight source {spec.source}")


def run(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    """The model's first output in onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: batch})[0]


def node_names(model: onnx.ModelProto) -> list:
    return [node.name for node in model.graph.node]


def mixed_chain() -> onnx.ModelProto:
    """3x3 convs of 32-48 input channels (one strided), a 1x1 conv, an output count 8 does
    not divide, and a grouped conv: what the compression passes take and skip."""
    specs = [
        ConvSpec(32, weights="random", pads=(1, 1, 1, 1), name="stem"),
        ConvSpec(48, weights="random", pads=(1, 1, 1, 1), name="wide"),
        ConvSpec(40, kernel=(1, 1), weights="random", name="point"),
        ConvSpec(36, weights="random", strides=(2, 2), name="odd"),
        ConvSpec(32, weights="random", group=4, name="grouped"),
    ]
    return conv_chain(specs, input_shape=(8, 12, 12))
