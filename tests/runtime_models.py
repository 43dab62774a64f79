"""Small real ONNX models for the runtime tests, built with onnx.helper.

`small_cnn` is a conv -> relu -> pool -> linear classifier; `gdws_cnn` has the GDWS triple
the convert pass writes (channel Gather -> grouped KxK conv -> 1x1 conv); `foreign_op_graph`
holds a node TensorRT has no importer for. Batch axes are dynamic unless asked otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT, OUTPUT = "images", "logits"
CLASSES = 10


def _save(nodes: List[onnx.NodeProto], inits: list, shape: Sequence, path: Path, opsets=()) -> Path:
    graph = helper.make_graph(
        nodes,
        "runtime_test",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [shape[0], CLASSES])],
        inits,
    )
    imports = [helper.make_opsetid("", 17), *opsets]
    model = helper.make_model(graph, opset_imports=imports, producer_name="gdws-tests")
    model.ir_version = 8
    if not opsets:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _weights(rng: np.random.Generator, name: str, shape: Sequence[int]) -> onnx.TensorProto:
    scale = 1.0 / np.sqrt(np.prod(shape[1:]))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _head(channels: int, rng: np.random.Generator, source: str) -> tuple:
    nodes = [
        helper.make_node("Relu", [source], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], [OUTPUT]),
    ]
    return nodes, [_weights(rng, "fc", (channels, CLASSES))]


def small_cnn(
    path: Union[str, Path],
    channels: int = 8,
    size: int = 16,
    in_channels: int = 3,
    layers: int = 1,
    batch: Union[int, str] = "N",
    seed: int = 0,
) -> Path:
    """`layers` 3x3 convs of `channels` channels on (batch, in_channels, size, size)."""
    rng = np.random.default_rng(seed)
    nodes, inits, source, width = [], [], INPUT, in_channels
    for index in range(layers):
        weight = f"w{index}"
        inits.append(_weights(rng, weight, (channels, width, 3, 3)))
        nodes.append(helper.make_node("Conv", [source, weight], [f"c{index}"], pads=[1, 1, 1, 1]))
        source, width = f"c{index}", channels
    head, head_inits = _head(channels, rng, source)
    return _save(nodes + head, inits + head_inits, [batch, in_channels, size, size], Path(path))


def gdws_cnn(path: Union[str, Path], channels: int = 4, out: int = 8, size: int = 8) -> Path:
    """Gather (channel c repeated g_c times) -> depthwise 3x3 -> pointwise 1x1, then a head."""
    rng = np.random.default_rng(1)
    repeats = np.arange(channels).repeat(np.arange(channels) % 2 + 1)  # g_c = 1, 2, 1, 2, ...
    kernels = len(repeats)
    inits = [
        numpy_helper.from_array(repeats.astype(np.int64), "channels"),
        _weights(rng, "depthwise", (kernels, 1, 3, 3)),
        _weights(rng, "pointwise", (out, kernels, 1, 1)),
    ]
    nodes = [
        helper.make_node("Gather", [INPUT, "channels"], ["gathered"], axis=1),
        helper.make_node(
            "Conv", ["gathered", "depthwise"], ["dw"], group=kernels, pads=[1, 1, 1, 1]
        ),
        helper.make_node("Conv", ["dw", "pointwise"], ["pw"]),
    ]
    head, head_inits = _head(out, rng, "pw")
    return _save(nodes + head, inits + head_inits, ["N", channels, size, size], Path(path))


def foreign_op_graph(path: Union[str, Path]) -> Path:
    """Relu -> com.example.FancyOp (no TensorRT importer, no plugin) -> Relu -> head."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Relu", [INPUT], ["a"], name="first_relu"),
        helper.make_node("FancyOp", ["a"], ["b"], name="fancy", domain="com.example"),
    ]
    head, inits = _head(3, rng, "b")
    opsets = [helper.make_opsetid("com.example", 1)]
    return _save(nodes + head, inits, [1, 3, 8, 8], Path(path), opsets)
