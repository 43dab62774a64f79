"""Static INT8 quantization (passes/int8), its QuantizeLinear / DequantizeLinear in the
mirror, the pipeline's --int8 and --method int8, and eval on an INT8 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.mirror import OnnxMirror

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "robust_photos.onnx"
CALIBRATION_SAMPLES = 256


def run_ort(model: onnx.ModelProto, feeds: dict, optimized: bool = True) -> list:
    """onnxruntime on the CPU; `optimized` False runs every node as written (the reference
    QuantizeLinear / Conv / DequantizeLinear kernels instead of fused int8 ones)."""
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return session.run(None, feeds)


def mirror_outputs(model: onnx.ModelProto, *inputs: np.ndarray) -> list:
    with torch.no_grad():
        result = OnnxMirror(model)(*[torch.from_numpy(x) for x in inputs])
    return [r.numpy() for r in (result if isinstance(result, tuple) else (result,))]


def qdq_graph() -> onnx.ModelProto:
    """x (2, 3, 4) -> per-tensor int8 Q/DQ; per-axis (axis 1) uint8 Q/DQ with zero points;
    an int8 initializer dequantized per axis 0 (a weight's form) added to x. Outputs the
    quantized tensors too, to compare integers."""
    initializers = [
        numpy_helper.from_array(np.array(0.25, np.float32), "s"),
        numpy_helper.from_array(np.array(3, np.int8), "z"),
        numpy_helper.from_array(np.array([0.5, 0.125, 2.0], np.float32), "s_axis"),
        numpy_helper.from_array(np.array([0, 128, 255], np.uint8), "z_axis"),
        numpy_helper.from_array(np.arange(-6, 6, dtype=np.int8).reshape(3, 4), "w"),
        numpy_helper.from_array(np.array([0.1, 0.2, 0.3], np.float32), "s_w"),
        numpy_helper.from_array(np.array([-2, 0, 5], np.int8), "z_w"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        helper.make_node("QuantizeLinear", ["x", "s_axis", "z_axis"], ["q_axis"], axis=1),
        helper.make_node("DequantizeLinear", ["q_axis", "s_axis", "z_axis"], ["dq_axis"], axis=1),
        helper.make_node("DequantizeLinear", ["w", "s_w", "z_w"], ["w_float"], axis=0),
        helper.make_node("Add", ["x", "w_float"], ["shifted"]),
    ]
    shape = [2, 3, 4]
    outputs = [
        helper.make_tensor_value_info("q", TensorProto.INT8, shape),
        helper.make_tensor_value_info("dq", TensorProto.FLOAT, shape),
        helper.make_tensor_value_info("q_axis", TensorProto.UINT8, shape),
        helper.make_tensor_value_info("dq_axis", TensorProto.FLOAT, shape),
        helper.make_tensor_value_info("shifted", TensorProto.FLOAT, shape),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        outputs,
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def ties_and_extremes() -> np.ndarray:
    """Inputs at every half step of both scales (ties: onnxruntime rounds half to even),
    and far outside both ranges (saturation)."""
    halves = (np.arange(24, dtype=np.float32) - 12 + 0.5).reshape(2, 3, 4)
    x = halves * np.array([0.25, 0.125, 0.5], np.float32).reshape(1, 3, 1)
    x[0, :, 0], x[1, :, 3] = 1e4, -1e4
    return x


def test_quantize_and_dequantize_equal_onnxruntime_at_ties_and_saturation():
    model, x = qdq_graph(), ties_and_extremes()
    onnx.checker.check_model(model, full_check=True)
    expected = run_ort(model, {"x": x}, optimized=False)
    actual = mirror_outputs(model, x)
    for name, a, b in zip(("q", "dq", "q_axis", "dq_axis", "shifted"), actual, expected):
        np.testing.assert_array_equal(a, b.astype(np.float32), err_msg=name)
    assert {-128.0, 127.0} <= set(actual[0].ravel()) and {0.0, 255.0} <= set(actual[2].ravel())


def test_rounding_gradient_passes_as_identity_inside_the_range_and_stops_outside():
    model = qdq_graph()
    x = torch.tensor(ties_and_extremes(), requires_grad=True)
    _, dq, _, dq_axis, _ = OnnxMirror(model)(x)
    (dq.sum() + dq_axis.sum()).backward()
    # d dq / dx is 1 where round(x / scale) + zero point lies in the type's range, else 0
    value = x.detach()
    inside = (torch.round(value / 0.25) + 3).clamp(-128, 127) == torch.round(value / 0.25) + 3
    scale = torch.tensor([0.5, 0.125, 2.0]).reshape(1, 3, 1)
    level = torch.round(value / scale) + torch.tensor([0.0, 128.0, 255.0]).reshape(1, 3, 1)
    inside_axis = (level >= 0) & (level <= 255)
    expected = inside.float() + inside_axis.float()
    np.testing.assert_array_equal(x.grad.numpy(), expected.numpy())
    assert not inside.all() and inside.any() and not inside_axis.all() and inside_axis.any()


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return load_dataset("photos:train").x[:CALIBRATION_SAMPLES]


@pytest.fixture(scope="module")
def bundled_int8(calibration) -> onnx.ModelProto:
    from gdws_deploy.passes.int8.quantize import quantize

    return quantize(onnx.load(str(BUNDLED)), calibration)


def output_step(model: onnx.ModelProto) -> float:
    """The scale of the last QuantizeLinear: one step of the INT8 model's logits."""
    last = [node for node in model.graph.node if node.op_type == "QuantizeLinear"][-1]
    scales = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    return float(scales[last.input[1]])


def test_mirror_equals_onnxruntime_on_the_quantized_bundled_model(bundled_int8):
    """Against onnxruntime's reference kernels (Q, float Conv, DQ as written) the mirror
    computes the same integers; the only gaps are where the two float convolutions' sums
    (their order differs: ~1e-6 apart) land on either side of a rounding boundary, one
    quantization step of one activation, which is rare. onnxruntime's fused int8 kernels
    (what eval's verdicts run) requantize in fixed point, so more logits sit a step apart;
    the top-1 class still agrees."""
    x = load_dataset("photos").x[:500]
    actual = mirror_outputs(bundled_int8, x)[0]
    reference = run_ort(bundled_int8, {"input": x}, optimized=False)[0]
    step = output_step(bundled_int8)
    gaps = np.abs(actual - reference)
    assert np.mean(gaps <= 1e-6 * step) >= 0.999 and gaps.max() <= 2 * step
    deployed = run_ort(bundled_int8, {"input": x})[0]
    assert np.abs(actual - deployed).max() <= 2 * step
    assert np.mean(actual.argmax(1) == deployed.argmax(1)) >= 0.99


def test_gradients_reach_the_input_through_every_quantize_dequantize(bundled_int8):
    x = torch.from_numpy(load_dataset("photos").x[:64]).requires_grad_(True)
    logits = OnnxMirror(bundled_int8)(x)
    torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
    per_sample = x.grad.abs().flatten(1).sum(1)
    assert bool((per_sample > 0).all())
    assert float((x.grad != 0).float().mean()) > 0.5
