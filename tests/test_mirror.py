"""The torch mirror computes what onnxruntime computes, op by op and on whole networks."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F  # noqa: N812 (the torch idiom)

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import node_name
from gdws_deploy.robustness.mirror import OnnxMirror, load_mirror
from models.export import export_onnx
from models.networks import ARCHITECTURES, randomize_batchnorm
from tests.digits_fixtures import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RNG = np.random.default_rng(0)


def _random(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def single_node_model(
    op: str,
    feeds: Dict[str, np.ndarray],
    inputs: Sequence[str],
    consts: Optional[Dict[str, np.ndarray]] = None,
    outputs: int = 1,
    opset: int = 17,
    **attrs,
) -> onnx.ModelProto:
    """One `op` node reading graph inputs `feeds` and initializers `consts` by name."""
    consts = consts or {}
    node = helper.make_node(
        op, list(inputs), [f"out{i}" for i in range(outputs)], name=f"the_{op}", **attrs
    )
    graph = helper.make_graph(
        [node],
        "single",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for name, v in feeds.items()
        ],
        [helper.make_empty_tensor_value_info(f"out{i}") for i in range(outputs)],
        [numpy_helper.from_array(value, name) for name, value in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def ort_outputs(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def mirror_outputs(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]):
    mirror = OnnxMirror(model)
    with torch.no_grad():
        result = mirror(*[torch.from_numpy(v) for v in feeds.values()])
    return [r.numpy() for r in (result if isinstance(result, tuple) else (result,))]


def assert_same_as_ort(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], atol: float = 1e-5):
    expected = ort_outputs(model, feeds)
    actual = mirror_outputs(model, feeds)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        if e.dtype.kind in "fc":
            np.testing.assert_allclose(a, e, rtol=0, atol=atol)
        else:
            np.testing.assert_array_equal(a, e)


X = _random(2, 4, 7, 6)
W = _random(6, 2, 3, 3)
BIAS = _random(6)
I64 = np.int64

CASES = {
    "conv_group_asym_pads_strides_dilations": (
        "Conv",
        {"x": X},
        ["x", "w", "b"],
        {"w": W, "b": BIAS},
        dict(group=2, pads=[0, 1, 1, 2], strides=[2, 1], dilations=[1, 2]),
    ),
    "conv_same_upper": (
        "Conv",
        {"x": X},
        ["x", "w"],
        {"w": W},
        dict(group=2, auto_pad="SAME_UPPER", strides=[2, 2]),
    ),
    "conv_same_lower": (
        "Conv",
        {"x": X},
        ["x", "w"],
        {"w": W},
        dict(group=2, auto_pad="SAME_LOWER", strides=[2, 2]),
    ),
    "conv_valid": ("Conv", {"x": X}, ["x", "w"], {"w": W}, dict(group=2, auto_pad="VALID")),
    "conv_depthwise": (
        "Conv",
        {"x": X},
        ["x", "w"],
        {"w": _random(4, 1, 3, 3)},
        dict(group=4, pads=[1, 1, 1, 1]),
    ),
    "conv_1d": (
        "Conv",
        {"x": _random(2, 3, 9)},
        ["x", "w"],
        {"w": _random(5, 3, 2)},
        dict(strides=[2]),
    ),
    "conv_transpose_output_padding": (
        "ConvTranspose",
        {"x": X},
        ["x", "w", "b"],
        {"w": _random(4, 3, 3, 3), "b": _random(6)},
        dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0]),
    ),
    "conv_transpose_asym_pads": (
        "ConvTranspose",
        {"x": X},
        ["x", "w", "b"],
        {"w": _random(4, 2, 3, 2), "b": _random(2)},
        dict(strides=[2, 3], pads=[0, 1, 2, 0], dilations=[2, 1]),
    ),
    "conv_transpose_same_upper": (
        "ConvTranspose",
        {"x": X},
        ["x", "w"],
        {"w": _random(4, 2, 3, 3)},
        dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    "conv_transpose_output_shape": (
        "ConvTranspose",
        {"x": X},
        ["x", "w"],
        {"w": _random(4, 2, 3, 3)},
        dict(strides=[2, 2], output_shape=[14, 13]),
    ),
    "batch_norm_running_stats": (
        "BatchNormalization",
        {"x": X},
        ["x", "s", "b", "m", "v"],
        {"s": _random(4), "b": _random(4), "m": _random(4), "v": np.abs(_random(4)) + 0.5},
        dict(epsilon=1e-3),
    ),
    "relu": ("Relu", {"x": X}, ["x"], {}, {}),
    "leaky_relu": ("LeakyRelu", {"x": X}, ["x"], {}, dict(alpha=0.2)),
    "prelu_per_channel": ("PRelu", {"x": X}, ["x", "s"], {"s": _random(4, 1, 1)}, {}),
    "clip_min_max": (
        "Clip",
        {"x": X},
        ["x", "lo", "hi"],
        {"lo": np.float32(-0.5), "hi": np.float32(0.7)},
        {},
    ),
    "clip_min_only": ("Clip", {"x": X}, ["x", "lo"], {"lo": np.float32(-0.2)}, {}),
    "sigmoid": ("Sigmoid", {"x": X}, ["x"], {}, {}),
    "tanh": ("Tanh", {"x": X}, ["x"], {}, {}),
    "hard_sigmoid": ("HardSigmoid", {"x": X}, ["x"], {}, dict(alpha=0.3, beta=0.4)),
    "hard_swish": ("HardSwish", {"x": X * 4}, ["x"], {}, {}),
    "add_broadcast": ("Add", {"x": X}, ["x", "c"], {"c": _random(4, 1, 1)}, {}),
    "sub_broadcast": ("Sub", {"x": X}, ["c", "x"], {"c": _random(6)}, {}),
    "mul_two_inputs": ("Mul", {"x": X, "y": _random(1, 4, 7, 1)}, ["x", "y"], {}, {}),
    "div_float": ("Div", {"x": X}, ["x", "c"], {"c": np.abs(_random(6)) + 1}, {}),
    "div_int_truncates": (
        "Div",
        {"x": np.array([-7, 7, 5], I64)},
        ["x", "c"],
        {"c": np.array([2, -2, 3], I64)},
        {},
    ),
    "matmul": ("MatMul", {"x": X}, ["x", "m"], {"m": _random(6, 5)}, {}),
    "gemm_linear": (
        "Gemm",
        {"x": _random(3, 8)},
        ["x", "w", "b"],
        {"w": _random(5, 8), "b": _random(5)},
        dict(transB=1),
    ),
    "gemm_general": (
        "Gemm",
        {"x": _random(8, 3)},
        ["x", "w", "c"],
        {"w": _random(8, 5), "c": _random(3, 5)},
        dict(transA=1, alpha=0.5, beta=2.0),
    ),
    "max_pool_asym_pads": (
        "MaxPool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[3, 2], pads=[1, 0, 0, 1], strides=[2, 2]),
    ),
    "max_pool_ceil_dilated": (
        "MaxPool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, dilations=[1, 2]),
    ),
    "max_pool_same_upper": (
        "MaxPool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    ),
    "average_pool_exclude_pad": (
        "AveragePool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ),
    "average_pool_include_pad": (
        "AveragePool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, strides=[2, 2]),
    ),
    "average_pool_asym_pads": (
        "AveragePool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[2, 3], pads=[1, 0, 0, 2]),
    ),
    "average_pool_asym_include_pad": (
        "AveragePool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[2, 3], pads=[0, 2, 1, 0], count_include_pad=1),
    ),
    "average_pool_ceil": (
        "AveragePool",
        {"x": X},
        ["x"],
        {},
        dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    ),
    "global_average_pool": ("GlobalAveragePool", {"x": X}, ["x"], {}, {}),
    "global_max_pool": ("GlobalMaxPool", {"x": X}, ["x"], {}, {}),
    "flatten_axis_2": ("Flatten", {"x": X}, ["x"], {}, dict(axis=2)),
    "flatten_axis_0": ("Flatten", {"x": X}, ["x"], {}, dict(axis=0)),
    "flatten_negative_axis": ("Flatten", {"x": X}, ["x"], {}, dict(axis=-1)),
    "reshape_zero_copies": ("Reshape", {"x": X}, ["x", "s"], {"s": np.array([0, -1, 6], I64)}, {}),
    "transpose": ("Transpose", {"x": X}, ["x"], {}, dict(perm=[0, 2, 3, 1])),
    "transpose_default_reverses": ("Transpose", {"x": X}, ["x"], {}, {}),
    "concat": ("Concat", {"x": X, "y": _random(2, 3, 7, 6)}, ["x", "y"], {}, dict(axis=1)),
    "gather_channels": (
        "Gather",
        {"x": X},
        ["x", "i"],
        {"i": np.array([3, 0, 0, 2, 1], I64)},
        dict(axis=1),
    ),
    "gather_scalar": ("Gather", {"x": X}, ["x", "i"], {"i": np.array(-1, I64)}, dict(axis=2)),
    "gather_negative_axis": (
        "Gather",
        {"x": X},
        ["x", "i"],
        {"i": np.array([[1], [-2]], I64)},
        dict(axis=-2),
    ),
    "gather_2d_negative": (
        "Gather",
        {"x": X},
        ["x", "i"],
        {"i": np.array([[0, -1], [2, -3]], I64)},
        dict(axis=3),
    ),
    "slice_steps_and_clamping": (
        "Slice",
        {"x": X},
        ["x", "s", "e", "a", "t"],
        {
            "s": np.array([1, -1, 0], I64),
            "e": np.array([2**62, -100, -1], I64),
            "a": np.array([1, 2, -1], I64),
            "t": np.array([2, -2, 1], I64),
        },
        {},
    ),
    "pad_constant": (
        "Pad",
        {"x": X},
        ["x", "p", "v"],
        {"p": np.array([0, 0, 1, 2, 0, 1, 0, 3], I64), "v": np.float32(0.5)},
        {},
    ),
    "pad_reflect": (
        "Pad",
        {"x": X},
        ["x", "p"],
        {"p": np.array([0, 0, 2, 1, 0, 0, 1, 2], I64)},
        dict(mode="reflect"),
    ),
    "pad_edge_negative": (
        "Pad",
        {"x": X},
        ["x", "p"],
        {"p": np.array([0, 0, 2, -1, 0, 0, -2, 2], I64)},
        dict(mode="edge"),
    ),
    "pad_omitted_constant_value": (
        "Pad",
        {"x": X},
        ["x", "p", ""],
        {"p": np.array([0, 1, 2, 0, 0, 0, 1, 3], I64)},
        {},
    ),
    "clip_omitted_min": ("Clip", {"x": X}, ["x", "", "hi"], {"hi": np.float32(0.3)}, {}),
    "lrn_odd_size": ("LRN", {"x": X}, ["x"], {}, dict(size=3, alpha=0.5, beta=0.75, bias=2.0)),
    "identity": ("Identity", {"x": X}, ["x"], {}, {}),
    "dropout_is_identity": ("Dropout", {"x": X}, ["x"], {}, {}),
    "reduce_mean_attr_axes": ("ReduceMean", {"x": X}, ["x"], {}, dict(axes=[1, 3], keepdims=0)),
    "reduce_sum_input_axes": ("ReduceSum", {"x": X}, ["x", "a"], {"a": np.array([-1], I64)}, {}),
    "reduce_max_all_axes": ("ReduceMax", {"x": X}, ["x"], {}, dict(keepdims=0)),
    "reduce_min": ("ReduceMin", {"x": X}, ["x"], {}, dict(axes=[0, 2])),
    "softmax": ("Softmax", {"x": X}, ["x"], {}, dict(axis=1)),
    "squeeze": ("Squeeze", {"x": _random(2, 1, 3, 1)}, ["x", "a"], {"a": np.array([3], I64)}, {}),
    "squeeze_all": ("Squeeze", {"x": _random(2, 1, 3, 1)}, ["x"], {}, {}),
    "unsqueeze": ("Unsqueeze", {"x": X}, ["x", "a"], {"a": np.array([-1, 0], I64)}, {}),
    "shape_start_end": ("Shape", {"x": X}, ["x"], {}, dict(start=1, end=-1)),
    "size": ("Size", {"x": X}, ["x"], {}, {}),
    "cast": ("Cast", {"x": X * 3}, ["x"], {}, dict(to=TensorProto.INT64)),
    "equal": (
        "Equal",
        {"x": np.array([1, 2, 3], I64)},
        ["x", "c"],
        {"c": np.array([1, 0, 3], I64)},
        {},
    ),
    "where": (
        "Where",
        {"x": X},
        ["c", "x", "y"],
        {"c": RNG.random((7, 6)) > 0.5, "y": _random(1)},
        {},
    ),
    "constant_of_shape": (
        "ConstantOfShape",
        {"s": np.array([2, 3], I64)},
        ["s"],
        {},
        dict(value=numpy_helper.from_array(np.array([1.5], np.float32))),
    ),
    "expand_bidirectional": (
        "Expand",
        {"x": _random(3, 1)},
        ["x", "s"],
        {"s": np.array([2, 1, 4], I64)},
        {},
    ),
    "range": (
        "Range",
        {"n": np.array(7, I64)},
        ["a", "n", "d"],
        {"a": np.array(1, I64), "d": np.array(2, I64)},
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_op_matches_onnxruntime(case: str):
    op, feeds, inputs, consts, attrs = CASES[case]
    assert_same_as_ort(single_node_model(op, feeds, inputs, consts, **attrs), feeds)


POSITIVE = np.abs(X) + 0.1
BOOLS = RNG.random((3, 4)) > 0.5
ELEMENTWISE = {
    "Neg": {"x": X},
    "Exp": {"x": X},
    "Log": {"x": POSITIVE},
    "Sqrt": {"x": POSITIVE},
    "Abs": {"x": X},
    "Floor": {"x": X * 3},
    "Ceil": {"x": X * 3},
    "Erf": {"x": X},
    "Reciprocal": {"x": POSITIVE},
    "Not": {"x": BOOLS},
    "Pow": {"x": POSITIVE, "y": X},
    "Less": {"x": X, "y": X[:, :1]},
    "LessOrEqual": {"x": np.round(X), "y": np.round(X[:1])},
    "Greater": {"x": X, "y": X[:, :1]},
    "GreaterOrEqual": {"x": np.round(X), "y": np.round(X[:1])},
    "And": {"x": BOOLS, "y": BOOLS[:1]},
    "Or": {"x": BOOLS, "y": ~BOOLS},
}


@pytest.mark.parametrize("op", sorted(ELEMENTWISE))
def test_elementwise_op_matches_onnxruntime(op: str):
    feeds = ELEMENTWISE[op]
    assert_same_as_ort(single_node_model(op, feeds, list(feeds)), feeds)


OLD_OPSET_CASES = {
    "softmax_opset11_coerces_to_2d": ("Softmax", ["x"], {}, dict(axis=2), 11),
    "squeeze_opset11_axes_attribute": ("Squeeze", ["x"], {}, dict(axes=[1]), 11),
    "clip_opset6_attributes": ("Clip", ["x"], {}, dict(min=-0.3, max=0.4), 6),
    "pad_opset2_attributes": ("Pad", ["x"], {}, dict(pads=[0, 0, 1, 0, 0, 0, 0, 2], value=2.0), 2),
    "slice_opset9_attributes": (
        "Slice",
        ["x"],
        {},
        dict(starts=[1, 0], ends=[3, -1], axes=[2, 3]),
        9,
    ),
    "reduce_mean_opset18_axes_input": ("ReduceMean", ["x", "a"], {"a": np.array([2], I64)}, {}, 18),
}


@pytest.mark.parametrize("case", sorted(OLD_OPSET_CASES))
def test_opset_specific_forms_match_onnxruntime(case: str):
    op, inputs, consts, attrs, opset = OLD_OPSET_CASES[case]
    feeds = {"x": _random(2, 1, 5, 4)}
    assert_same_as_ort(single_node_model(op, feeds, inputs, consts, opset=opset, **attrs), feeds)


def test_constant_node_feeds_arithmetic():
    nodes = [
        helper.make_node("Constant", [], ["c"], value_floats=[0.5, -1.0, 2.0]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(3.0))),
        helper.make_node("Mul", ["x", "c"], ["y"]),
        helper.make_node("Add", ["y", "k"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_empty_tensor_value_info("out")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert_same_as_ort(model, {"x": _random(2, 3)})


class _LegacyViews(nn.Module):
    """x.view(x.size(0), -1) and expand(): the Shape arithmetic legacy exports contain."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)
        self.offset = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = y + self.offset.expand(x.size(0), -1, 8, 8)
        return self.head(y.view(y.size(0), -1))


def test_dynamic_batch_shape_arithmetic_runs_at_another_batch_size(tmp_path):
    path = export_onnx(_LegacyViews(), tmp_path / "legacy.onnx", input_shape=(1, 3, 8, 8))
    model = onnx.load(str(path))
    assert {"Shape", "Gather", "Concat", "Reshape"} <= {n.op_type for n in model.graph.node}
    assert_same_as_ort(model, {"input": _random(5, 3, 8, 8)})


def _lrn_by_definition(x: np.ndarray, size: int, alpha: float, beta: float, bias: float):
    """The ONNX spec, channel by channel: the window of c is [c - floor((size-1)/2),
    c + ceil((size-1)/2)]. (onnx.reference's LRN loops over the batch axis instead.)"""
    square_sum = np.zeros_like(x)
    for c in range(x.shape[1]):
        low, high = max(0, c - (size - 1) // 2), min(x.shape[1], c + size // 2 + 1)
        square_sum[:, c] = (x[:, low:high] ** 2).sum(axis=1)
    return x / (bias + alpha / size * square_sum) ** beta


def test_lrn_even_size_window_follows_the_onnx_definition():
    """onnxruntime refuses even sizes; ONNX's window reaches one channel further forward
    than back, torch's the other way."""
    feeds = {"x": X * 3}
    model = single_node_model("LRN", feeds, ["x"], size=4, alpha=0.9, beta=0.6, bias=1.5)
    (actual,) = mirror_outputs(model, feeds)
    expected = _lrn_by_definition(feeds["x"], 4, 0.9, 0.6, 1.5)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    torch_form = F.local_response_norm(torch.from_numpy(feeds["x"]), 4, 0.9, 0.6, 1.5)
    assert not np.allclose(actual, torch_form.numpy(), rtol=1e-3)


def test_torch_local_response_norm_export_matches_onnxruntime(tmp_path):
    """torch exports it as Pad (constant value omitted), AveragePool and an If-guarded
    Squeeze; an even size exercises the window's asymmetry."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3), nn.LocalResponseNorm(4, alpha=0.3, beta=0.75, k=2.0)]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    path = export_onnx(model, tmp_path / "lrn.onnx", input_shape=(1, 3, 8, 8))
    graph = onnx.load(str(path)).graph
    assert any(n.op_type == "Pad" and "" in n.input for n in graph.node)
    feeds = {"input": _random(3, 3, 8, 8) * 4}
    (expected,) = ort_outputs(onnx.load(str(path)), feeds)
    (actual,) = mirror_outputs(onnx.load(str(path)), feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with torch.no_grad():
        np.testing.assert_allclose(
            actual, model(torch.from_numpy(feeds["input"])).numpy(), rtol=1e-4, atol=1e-5
        )


def _if_model() -> onnx.ModelProto:
    """y = If(flag, then: Conv(x, w) * 2, else: x + 1 summed over channels), where the
    branches read the outer input x and the outer initializer w."""
    then_graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Constant", [], ["two"], value_float=2.0),
            helper.make_node("Mul", ["c", "two"], ["then_y"]),
        ],
        "then",
        [],
        [helper.make_empty_tensor_value_info("then_y")],
    )
    else_graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "one"], ["shifted"]),
            helper.make_node("ReduceSum", ["shifted", "axes"], ["else_y"]),
        ],
        "else",
        [],
        [helper.make_empty_tensor_value_info("else_y")],
        [
            numpy_helper.from_array(np.float32(1.0), "one"),
            numpy_helper.from_array(np.array([1], I64), "axes"),
        ],
    )
    node = helper.make_node(
        "If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph, name="the_if"
    )
    graph = helper.make_graph(
        [node],
        "if",
        [
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 7, 6]),
        ],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(_random(1, 4, 3, 3), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("flag", [True, False])
def test_if_runs_the_branch_its_condition_picks(flag: bool):
    feeds = {"flag": np.array(flag), "x": X}
    assert_same_as_ort(_if_model(), feeds)


def test_outer_initializer_read_in_a_branch_gets_its_gradient():
    mirror = OnnxMirror(_if_model())
    mirror(torch.tensor(True), torch.from_numpy(X)).square().sum().backward()
    weight = mirror.tensor("w")
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    paths = {}
    for index, name in enumerate(sorted(ARCHITECTURES)):
        torch.manual_seed(index)
        model = randomize_batchnorm(ARCHITECTURES[name](), seed=index)
        paths[name] = (export_onnx(model, folder / f"{name}.onnx"), model)
    return paths


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_zoo_network_matches_onnxruntime(zoo, name):
    path, _ = zoo[name]
    model = onnx.load(str(path))
    assert_same_as_ort(model, {"input": RNG.random((2, 3, 32, 32), dtype=np.float32)})


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_gdws_converted_zoo_network_matches_onnxruntime(zoo, name):
    from gdws_deploy.pipeline.convert import convert

    converted, report = convert(zoo[name][0], mac_reduction=2.0, check_parity=False)
    assert report.converted > 0
    assert "Gather" in {node.op_type for node in converted.graph.node}
    assert_same_as_ort(converted, {"input": RNG.random((2, 3, 32, 32), dtype=np.float32)})


def test_input_gradient_equals_native_torch_model(zoo):
    path, native = zoo["preactresnet18"]
    mirror = load_mirror(path)
    x = torch.rand(2, 3, 32, 32)
    grads = []
    for model in (native.eval(), mirror):
        inputs = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(inputs), torch.tensor([1, 7]))
        grads.append(torch.autograd.grad(loss, inputs)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_initializers_are_named_parameters_and_buffers(zoo):
    path, native = zoo["preactresnet18"]
    mirror = load_mirror(path)
    assert mirror.onnx_names["conv1_weight"] == "conv1.weight"
    assert mirror.torch_names["conv1.weight"] == "conv1_weight"
    parameters = dict(mirror.named_parameters())
    buffers = dict(mirror.named_buffers())
    assert "layers_0_bn1_weight" in parameters
    assert "layers_0_bn1_running_mean" in buffers  # running statistics are not trained
    torch.testing.assert_close(mirror.tensor("conv1.weight"), native.conv1.weight)


def test_batch_norm_uses_running_statistics_even_in_train_mode(zoo):
    path, _ = zoo["preactresnet18"]
    mirror = load_mirror(path)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        evaluated = mirror.eval()(x)
        trained = mirror.train()(x)
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)


def test_unsupported_op_names_the_op_and_node():
    model = single_node_model("Einsum", {"x": X}, ["x"], equation="ij...->ji...")
    with pytest.raises(GdwsError, match=r"unsupported op Einsum in node 'the_Einsum'"):
        OnnxMirror(model)


def test_maxpool_indices_output_is_refused():
    model = single_node_model("MaxPool", {"x": X}, ["x"], outputs=2, kernel_shape=[2, 2])
    with pytest.raises(GdwsError, match="Indices"):
        OnnxMirror(model)


def test_missing_model_file_is_a_user_error(tmp_path):
    with pytest.raises(GdwsError, match="does not exist"):
        load_mirror(tmp_path / "absent.onnx")


def test_recording_gives_conv_inputs_outputs_and_matching_patches(zoo):
    path, _ = zoo["vgg16"]
    model = onnx.load(str(path))
    convs = [node_name(n, i) for i, n in enumerate(model.graph.node) if n.op_type == "Conv"]
    mirror = OnnxMirror(model)
    x = torch.rand(2, 3, 32, 32)
    with mirror.recording(convs[:2]) as records, torch.no_grad():
        mirror(x)
    assert set(records) == set(convs[:2])
    (inputs, (output,)) = records[convs[0]]
    assert inputs[0] is x
    weight, bias = inputs[1], inputs[2]
    patches = mirror.compiled(convs[0]).patches(x)  # (N, C*k, L)
    rebuilt = weight.reshape(len(weight), -1) @ patches + bias[:, None]
    torch.testing.assert_close(rebuilt.reshape(output.shape), output, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        mirror(x)
    assert set(records) == set(convs[:2])  # recording ended with the context
    with pytest.raises(GdwsError, match="no runtime node named 'nope'"), mirror.recording(["nope"]):
        pass
