"""Static INT8 quantization (passes/int8), its QuantizeLinear / DequantizeLinear in the
mirror, the pipeline's --int8 and --method int8, and eval on an INT8 model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.mirror import OnnxMirror
from tests.tensorrt_rtx import assert_parses, needs_tensorrt_rtx

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


def float_weights_only(qdq: onnx.ModelProto) -> tuple:
    """The QDQ model with every activation's QuantizeLinear -> DequantizeLinear replaced by
    an Identity (its weights stay rounded), and {Identity name: that activation's scale}."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    weights = {tensor.name for tensor in model.graph.initializer}
    scales = {t.name: float(numpy_helper.to_array(t).max()) for t in model.graph.initializer}
    quantized = {
        node.output[0]: node for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in weights
    }  # fmt: skip
    nodes, steps = [], {}
    for node in model.graph.node:
        if node.output[0] in quantized:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized:
            source = quantized[node.input[0]]
            name = f"{node.output[0]}/exact"
            nodes.append(helper.make_node("Identity", [source.input[0]], node.output, name))
            steps[name] = scales[source.input[1]]
            continue
        nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model, steps


def rounding_bounds(qdq: onnx.ModelProto, x: np.ndarray) -> tuple:
    """The logits with INT8 weights and exact activations, and two bounds on how far
    rounding the activations moves each logit, to first order. Activation t is rounded by
    e_t with |e_t| <= s_t / 2 (its step), so |d logit_k| <= sum_t s_t / 2 * ||g_kt||_1,
    g_kt = d logit_k / d t: the worst case, every rounding aligned. As independent noise
    uniform in [-s_t / 2, s_t / 2] (variance s_t^2 / 12), d logit_k has the standard
    deviation sqrt(sum_t s_t^2 / 12 * ||g_kt||_2^2)."""
    model, steps = float_weights_only(qdq)
    mirror = OnnxMirror(model)
    inputs = torch.from_numpy(x).requires_grad_(True)  # the input is quantized too
    with mirror.recording(list(steps)) as records:
        logits = mirror(inputs)
    activations = {name: records[name][1][0] for name in steps}
    for tensor in activations.values():
        tensor.retain_grad()
    worst, variance = np.zeros(logits.shape), np.zeros(logits.shape)
    for k in range(logits.shape[1]):
        for tensor in activations.values():
            tensor.grad = None
        logits[:, k].sum().backward(retain_graph=True)  # samples are independent
        for name, tensor in activations.items():
            grad = tensor.grad.flatten(1).double()
            worst[:, k] += steps[name] / 2 * grad.abs().sum(1).numpy()
            variance[:, k] += steps[name] ** 2 / 12 * (grad**2).sum(1).numpy()
    return logits.detach().numpy(), worst, np.sqrt(variance)


def test_int8_logits_stay_within_the_rounding_bounds_and_keep_clear_classes(
    bundled_int8, calibration
):
    """On calibration inputs (inside every calibrated range: nothing saturates), INT8
    logits = float logits + what rounding the weights moved (exact: the model with INT8
    weights, float activations) + what rounding the activations moved: within the
    first-order worst case, and within 6 standard deviations of the noise model (the
    deployed int8 kernels' one-step requantization gaps included). A sample whose float
    margin exceeds twice that keeps its class."""
    original = onnx.load(str(BUNDLED))
    x = calibration[:128]
    expected = run_ort(original, {"input": x})[0]
    actual = run_ort(bundled_int8, {"input": x})[0]
    rounded_weights, worst, deviation = rounding_bounds(bundled_int8, x)
    weights_moved = np.abs(rounded_weights - expected)
    assert np.all(np.abs(actual - expected) <= weights_moved + worst)
    assert np.all(np.abs(actual - rounded_weights) <= 6 * deviation)
    ordered = np.sort(expected, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > 2 * (weights_moved + 6 * deviation).max(axis=1)
    assert clear.mean() > 0.5  # the bound says something
    assert np.all(actual[clear].argmax(1) == expected[clear].argmax(1))


def test_int8_top1_agrees_with_the_float_model_on_the_test_split(bundled_int8):
    x = load_dataset("photos").x[:500]
    float_top1 = run_ort(onnx.load(str(BUNDLED)), {"input": x})[0].argmax(1)
    assert np.mean(run_ort(bundled_int8, {"input": x})[0].argmax(1) == float_top1) >= 0.97


def test_method_int8_writes_a_checker_valid_symmetric_qdq_model(tmp_path, calibration):
    from gdws_deploy.pipeline.convert import convert_file

    output = tmp_path / "photos.int8.onnx"
    report, rewritten = convert_file(BUNDLED, output, method="int8", int8_calibration=calibration)
    assert report.int8 and not rewritten and report.macs_after == report.macs_before
    assert report.int8_deviation.samples == CALIBRATION_SAMPLES
    assert report.int8_deviation.top1_agreement >= 0.95
    onnx.checker.check_model(str(output), full_check=True)
    model = onnx.load(str(output))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantizers = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    for node in quantizers:  # TensorRT: signed int8, zero point 0
        zero = initializers[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any()
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    for conv in convs:  # weights: float, per output channel, behind their own Q/DQ pair
        dequantize = next(n for n in model.graph.node if conv.input[1] in n.output)
        quantize = next(n for n in model.graph.node if dequantize.input[0] in n.output)
        weight, scale = initializers[quantize.input[0]], initializers[quantize.input[1]]
        assert weight.dtype == np.float32 and scale.shape == (weight.shape[0],)
    logits = run_ort(model, {"input": calibration[:8]})[0]
    assert logits.shape == (8, 10) and np.all(np.isfinite(logits))


def test_int8_after_gdws_quantizes_the_rewritten_model(calibration):
    from gdws_deploy.pipeline.convert import convert

    model, report = convert(BUNDLED, mac_reduction=2, int8=True, int8_calibration=calibration)
    assert report.int8 and report.converted > 0 and 2 <= report.reduction <= 2.02
    assert report.parity is not None and report.parity < 0.05  # the float rewrite's own
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Conv") > 5 and "QuantizeLinear" in ops  # GDWS's convs, quantized
    assert report.int8_deviation.top1_agreement >= 0.95
    assert report.to_dict()["int8_deviation"]["samples"] == CALIBRATION_SAMPLES


def two_input_model() -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "ab"]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "two", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("changes", "samples", "fragment"),
    [
        ({"int8": True}, None, "INT8 quantization needs calibration samples"),
        ({"mac_reduction": 2}, lambda x: x, "ask for int8 too"),
        ({"method": "int8", "mac_reduction": 2}, lambda x: x, "no target (got mac_reduction)"),
        ({"method": "int8"}, lambda x: x[:, :, :16], "do not fit the input"),
        ({"method": "int8"}, lambda x: x[0], "the model takes 4-D batches"),
        ({"method": "int8"}, lambda x: x[:0], "at least one sample is needed"),
        ({"method": "int8"}, lambda x: x.astype(int), "must be a float array"),
        ({"method": "int8"}, lambda x: x * np.nan, "NaN or infinite"),
    ],
)
def test_bad_int8_options_are_one_line_errors_and_write_nothing(
    tmp_path, calibration, changes, samples, fragment
):
    from gdws_deploy.errors import GdwsError
    from gdws_deploy.pipeline.convert import convert_file

    given = None if samples is None else samples(calibration)
    with pytest.raises(GdwsError, match=re.escape(fragment)) as raised:
        convert_file(BUNDLED, tmp_path / "out.onnx", int8_calibration=given, **changes)
    assert "\n" not in str(raised.value) and not list(tmp_path.iterdir())


def test_a_quantized_or_two_input_model_is_refused_in_one_line(tmp_path, bundled_int8):
    from gdws_deploy.errors import GdwsError
    from gdws_deploy.pipeline.convert import convert

    samples = np.zeros((4, 1, 32, 32), np.float32)
    with pytest.raises(GdwsError, match=re.escape("quantized already (QuantizeLinear nodes)")):
        convert(bundled_int8, method="int8", int8_calibration=samples)
    with pytest.raises(GdwsError, match="INT8 calibration feeds one input; the model has 2"):
        convert(two_input_model(), method="int8", int8_calibration=samples)


def test_cli_int8_after_gdws_at_2x_writes_the_quantized_conversion(capsys, tmp_path):
    from tests.cli_run import run_cli

    output, table = tmp_path / "photos.onnx", tmp_path / "report.json"
    result = run_cli(
        capsys, "convert", BUNDLED, "--method", "gdws", "--mac-reduction", "2", "--int8",
        "--calib", "photos:train", "--calib-limit", 64, "-o", output, "--report", table,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "quantized to INT8 (QDQ)" in result.out and "on 64 calibration samples" in result.out
    record = json.loads(table.read_text())
    assert record["int8"] and record["int8_deviation"]["samples"] == 64
    assert 2 <= record["reduction"] <= 2.02 and record["parity"] < 0.05
    onnx.checker.check_model(str(output), full_check=True)
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(output)).graph.node}


def test_cli_method_int8_names_its_output_after_the_model(capsys, tmp_path):
    from tests.cli_run import run_cli

    source = tmp_path / "photos.onnx"
    source.write_bytes(BUNDLED.read_bytes())
    result = run_cli(capsys, "convert", source, "--method", "int8", "--calib", "photos:train")
    assert result.code == 0, result.err
    assert f"wrote {tmp_path / 'photos.int8.onnx'} (INT8)" in result.out
    assert source.read_bytes() == BUNDLED.read_bytes()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--int8",), "INT8 calibrates on data: give --calib SPEC"),
        (("--method", "int8"), "INT8 calibrates on data: give --calib SPEC"),
        (("--calib", "photos:train"), "--calib calibrates INT8: give --int8"),
        (("--calib-limit", "9"), "--calib calibrates INT8: give --int8"),
        (("--method", "int8", "--mac-reduction", "2"), "--method int8 takes no target, not"),
        (("--method", "int8", "--beta", "0.1"), "--method int8 takes no target, not --beta"),
        (("--int8", "--calib", "nowhere:x"), "nowhere"),
        (("--int8", "--calib", "photos", "--max-robust-drop", "0.01", "--dataset", "photos"),
         "--max-robust-drop searches float conversions"),
    ],
)  # fmt: skip
def test_cli_bad_int8_flags_are_one_line_errors_and_write_nothing(
    capsys, tmp_path, flags, fragment
):
    from tests.cli_run import assert_one_line_error, run_cli

    result = run_cli(capsys, "convert", BUNDLED, "-o", tmp_path / "out.onnx", *flags)
    assert_one_line_error(result, fragment)
    assert not list(tmp_path.iterdir())


def test_cli_quantizing_a_quantized_model_is_one_line(capsys, tmp_path, bundled_int8):
    from tests.cli_run import assert_one_line_error, run_cli

    source = tmp_path / "int8.onnx"
    onnx.save(bundled_int8, str(source))
    result = run_cli(capsys, "convert", source, "--method", "int8", "--calib", "photos:train")
    assert_one_line_error(result, "the model is quantized already (QuantizeLinear nodes)")
    assert [path.name for path in tmp_path.iterdir()] == ["int8.onnx"]


def test_eval_attacks_the_int8_model_through_the_mirror_and_judges_the_file(
    capsys, tmp_path, bundled_int8
):
    """The verdicts are onnxruntime's on the QDQ file as written (its int8 kernels): eval's
    clean accuracy is that of an InferenceSession of the file on the same samples."""
    from tests.cli_run import run_cli

    model, record = tmp_path / "photos.int8.onnx", tmp_path / "eval.json"
    onnx.save(bundled_int8, str(model))
    result = run_cli(
        capsys, "eval", model, "--dataset", "photos", "--limit", 40, "--eps", "4/255",
        "--steps", 3, "--json", record,
    )  # fmt: skip
    assert result.code == 0, result.err
    report = json.loads(record.read_text())
    data = load_dataset("photos").limit(40)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    clean = float(np.mean(session.run(None, {"input": data.x})[0].argmax(1) == data.y))
    assert report["clean"] == pytest.approx(clean)
    assert report["robust"] < report["clean"]  # the attack got gradients through Q/DQ


@needs_tensorrt_rtx
def test_tensorrt_rtx_parser_accepts_the_int8_models(tmp_path, calibration):
    """TensorRT's own ONNX parser imports both as explicit INT8 (its parser refuses an
    int32 bias DequantizeLinear, which is why the bias stays float)."""
    from gdws_deploy.pipeline.convert import convert_file

    for name, changes in (("int8", {"method": "int8"}), ("gdws.int8", {"mac_reduction": 2})):
        output = tmp_path / f"photos.{name}.onnx"
        convert_file(BUNDLED, output, int8=True, int8_calibration=calibration[:32], **changes)
        assert_parses(output)


def test_int8_weights_are_counted_at_eight_bits(bundled_int8):
    """Kept float for TensorRT to quantize, the weights are stored as int8 all the same:
    a quarter of the float bits, plus one float scale per output channel."""
    from gdws_deploy.ir.size import weight_bits

    before, after = weight_bits(onnx.load(str(BUNDLED))), weight_bits(bundled_int8)
    assert before / 4 < after < before / 4 * 1.05
