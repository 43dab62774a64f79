"""Half-precision exports: attacked through a float32 mirror, judged in float16 by onnxruntime."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gdws_deploy.robustness.alphas import eligible_convs, load_alphas
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.mirror import OnnxMirror
from models.export import INPUT_NAME, OUTPUT_NAME
from tests.cli_run import run_cli
from tests.digits_fixtures import DIGITS_SHAPE, one_torch_thread, trained_digits_cnn  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def half_model(tmp_path_factory):
    """The trained digits CNN after `.half()`: float16 input, weights and logits."""
    path = tmp_path_factory.mktemp("fp16") / "digits_fp16.onnx"
    model = copy.deepcopy(trained_digits_cnn()).half()
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(DIGITS_SHAPE, dtype=torch.float16),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


def _session(model) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def test_mirror_computes_a_half_model_in_float32_with_gradients(half_model):
    model = onnx.load(str(half_model))
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}
    session = _session(half_model)
    assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float16)"
    x = load_dataset("digits", limit=32).x
    (expected,) = session.run(None, {INPUT_NAME: x.astype(np.float16)})
    mirror = OnnxMirror(model)
    assert {p.dtype for p in mirror.parameters()} == {torch.float32}
    inputs = torch.from_numpy(x).requires_grad_()
    logits = mirror(inputs)
    assert logits.dtype == torch.float32
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits.detach().numpy(), expected, atol=2e-2 * scale)
    logits.sum().backward()
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0
    half_input = mirror(torch.from_numpy(x).half())  # float16 inputs are cast at the boundary
    torch.testing.assert_close(half_input, mirror(torch.from_numpy(x.astype(np.float16)).float()))


def test_cast_to_float16_inside_a_float32_graph_computes_in_float32():
    """float32 in -> Cast(float16) -> MatMul by a float16 weight -> Cast(float32) out:
    the mirror keeps float32 precision throughout, where onnxruntime rounds."""
    weight = np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
            helper.make_node("MatMul", ["x16", "w"], ["y16"]),
            helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT),
        ],
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    (rounded,) = _session(model).run(None, {"x": x})
    with torch.no_grad():
        actual = OnnxMirror(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(actual, x @ weight.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(actual, rounded, rtol=1e-2)  # onnxruntime rounds to float16


def test_cli_eval_attacks_a_half_model_and_judges_it_in_float16(half_model, tmp_path, capsys):
    out = tmp_path / "report.json"
    result = run_cli(
        capsys,
        *("eval", half_model, "--dataset", "digits", "--limit", "40", "--steps", "3"),
        *("--eps", "0.1", "--batch-size", "16", "--json", out),
    )
    assert result.code == 0, result.err
    report = json.loads(out.read_text())
    data = load_dataset("digits", limit=40)
    (logits,) = _session(half_model).run(None, {INPUT_NAME: data.x.astype(np.float16)})
    assert report["clean_acc"] == pytest.approx((logits.argmax(1) == data.y).mean())
    assert report["robust_acc"] < report["clean_acc"]


def test_cli_alphas_of_a_half_model(half_model, tmp_path, capsys):
    out = tmp_path / "alphas.npz"
    result = run_cli(
        capsys,
        *("alphas", half_model, "-o", out, "--dataset", "digits", "--limit", "16", "--steps", "2"),
    )
    assert result.code == 0, result.err
    alphas = load_alphas(out).alphas
    convs = eligible_convs(onnx.load(str(half_model)))
    assert sorted(alphas) == sorted(conv.name for conv in convs)
    for conv in convs:
        assert alphas[conv.name].shape == (conv.weight_shape[1],)
        assert np.isfinite(alphas[conv.name]).all() and (alphas[conv.name] > 0).all()


def test_cli_sweep_of_a_half_model_measures_every_point(half_model, tmp_path, capsys):
    out = tmp_path / "sweep"
    result = run_cli(
        capsys,
        *("sweep", half_model, "--dataset", "digits", "--limit", "32", "--steps", "2"),
        *("--mac-reductions", "1.5", "--duration", "0.1", "--rounds", "1", "--out", out),
    )
    assert result.code == 0, result.err
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [point["label"] for point in points] == ["original", "1.5x"]
    converted = onnx.load(points[1]["model"])
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert all(0 < point["robust_acc"] <= point["clean_acc"] for point in points)
