"""finetune: a PGD adversarial fine-tune that changes weight values and nothing else."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import gdws_deploy
from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks import make_attacks, pgd
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.finetune import (
    FinetuneOptions,
    batch_order,
    finetune,
    trainable_weights,
)
from gdws_deploy.robustness.mirror import OnnxMirror
from tests.cli_run import assert_one_line_error, run_cli
from tests.conv_models import ConvSpec, conv_chain
from tests.digits_fixtures import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUNDLED = "models/robust_photos.onnx"
(PGD,) = make_attacks("pgd-linf", {"linf": 8 / 255}, 3)
# The float initializers the classifier below reads as layer weights; the rest are its
# BatchNorm statistics, Clip bounds and a Reshape shape, which a fine-tune must not touch.
WEIGHTS = {"conv0.w", "conv0.b", "bn.scale", "bn.bias", "conv1.w", "head.w", "head.b"}
FROZEN = {"bn.mean", "bn.var", "clip.min", "clip.max", "flat.shape"}


def classifier(dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """digits images (N, 1, 8, 8) -> Conv -> BatchNorm -> Clip -> Conv (two zero kernels,
    scattered zeros) -> Relu -> Reshape -> MatMul + Add -> 10 scores."""
    rng = np.random.default_rng(0)
    conv1 = 0.3 * rng.standard_normal((8, 6, 3, 3))
    conv1[2, 1] = conv1[5, 4] = 0  # pruned kernels
    conv1[rng.random(conv1.shape) < 0.2] = 0  # pruned entries
    floats = {
        "conv0.w": 0.5 * rng.standard_normal((6, 1, 3, 3)),
        "conv0.b": 0.1 * rng.standard_normal(6),
        "bn.scale": 1 + 0.1 * rng.standard_normal(6),
        "bn.bias": 0.1 * rng.standard_normal(6),
        "bn.mean": 0.1 * rng.standard_normal(6),
        "bn.var": 1 + rng.random(6),
        "clip.min": np.array(0.0),
        "clip.max": np.array(6.0),
        "conv1.w": conv1,
        "head.w": 0.1 * rng.standard_normal((128, 10)),
        "head.b": 0.1 * rng.standard_normal(10),
    }
    numpy_type = helper.tensor_dtype_to_np_dtype(dtype)
    initializers = [numpy_helper.from_array(v.astype(numpy_type), k) for k, v in floats.items()]
    initializers.append(numpy_helper.from_array(np.array([-1, 128], np.int64), "flat.shape"))
    nodes = [
        helper.make_node("Conv", ["x", "conv0.w", "conv0.b"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c0", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b0"]
        ),
        helper.make_node("Clip", ["b0", "clip.min", "clip.max"], ["a0"]),
        helper.make_node("Conv", ["a0", "conv1.w"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"]),
        helper.make_node("Reshape", ["a1", "flat.shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "head.w"], ["scores"]),
        helper.make_node("Add", ["scores", "head.b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", dtype, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", dtype, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits:train", limit=256)


def skeleton(model: onnx.ModelProto) -> bytes:
    """The model with its initializers' values left out: nodes, names, shapes, types."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        for stored in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(stored)
    return copy.SerializeToString()


def values(model: onnx.ModelProto) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def ort_run(model, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_trainable_weights_are_layer_weights_and_biases_only():
    assert set(trainable_weights(classifier())) == WEIGHTS


def test_only_weight_values_change_the_graph_stays_byte_identical(digits):
    model = classifier()
    tuned, report = finetune(model, digits, FinetuneOptions(steps=5, batch_size=32, attack=PGD))
    assert skeleton(tuned) == skeleton(model)
    before, after = values(model), values(tuned)
    assert set(report.tensors) == WEIGHTS
    assert all(not np.array_equal(before[name], after[name]) for name in WEIGHTS)
    for name in FROZEN:
        assert before[name].tobytes() == after[name].tobytes(), name
    x = digits.x[:16]
    mirrored = OnnxMirror(tuned)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ort_run(tuned, x), mirrored, atol=1e-5)


def test_exact_zeros_stay_zero_and_every_other_weight_moves(digits):
    model = classifier()
    options = FinetuneOptions(steps=5, batch_size=32, lr=0.01, attack=PGD, weight_decay=5e-4)
    tuned, report = finetune(model, digits, options)
    before, after = values(model)["conv1.w"], values(tuned)["conv1.w"]
    zero = before == 0
    assert zero[2, 1].all() and zero[5, 4].all() and zero.sum() > 18
    assert (after[zero] == 0).all()
    assert (after[~zero] != before[~zero]).all()
    assert report.zeros == zero.sum()


def test_same_seed_same_weights_another_seed_others(digits):
    model = classifier()
    runs = [
        finetune(model, digits, FinetuneOptions(steps=3, batch_size=32, attack=PGD, seed=seed))
        for seed in (1, 1, 2)
    ]
    first, again, other = (tuned.SerializeToString() for tuned, _ in runs)
    assert first == again
    assert first != other
    assert runs[0][1].losses == runs[1][1].losses


def test_batch_order_walks_through_each_epoch_before_repeating():
    order = batch_order(samples=10, steps=7, batch_size=3, seed=0)
    assert order.shape == (7, 3)
    flat = order.reshape(-1)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def adversarial_loss(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy under the same seeded PGD, on a fixed batch."""
    mirror = OnnxMirror(model)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    x_adv, _ = pgd(mirror, inputs, labels, "linf", PGD.eps, PGD.steps, PGD.step_size)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(mirror(x_adv), labels))


def test_adversarial_loss_goes_down_over_steps(digits):
    model = classifier()
    held = load_dataset("digits", limit=200)
    losses = [adversarial_loss(model, held.x, held.y)]
    for steps in (10, 40):
        options = FinetuneOptions(steps=steps, batch_size=32, lr=0.2, attack=PGD)
        tuned, report = finetune(model, digits, options)
        losses.append(adversarial_loss(tuned, held.x, held.y))
    assert losses[0] > losses[1] > losses[2], losses
    assert np.mean(report.losses[-5:]) < np.mean(report.losses[:5])


def test_zero_steps_gives_the_same_outputs(digits):
    model = classifier()
    tuned, report = finetune(model, digits, FinetuneOptions(steps=0))
    assert report.losses == ()
    x = digits.x[:32]
    np.testing.assert_array_equal(ort_run(tuned, x), ort_run(model, x))


def test_float16_model_keeps_float16_weights_and_runs(digits):
    model = classifier(TensorProto.FLOAT16)
    tuned, _ = finetune(model, digits, FinetuneOptions(steps=3, batch_size=32, attack=PGD))
    assert skeleton(tuned) == skeleton(model)
    before, after = values(model), values(tuned)
    assert all(after[name].dtype == np.float16 for name in WEIGHTS | FROZEN - {"flat.shape"})
    assert not np.array_equal(before["conv1.w"], after["conv1.w"])
    assert (after["conv1.w"][before["conv1.w"] == 0] == 0).all()
    assert ort_run(tuned, digits.x[:8].astype(np.float16)).shape == (8, 10)


def test_quantized_model_is_refused():
    model = conv_chain([ConvSpec(4, source="dequantize")], dense_head=True)
    with pytest.raises(
        GdwsError, match=r"quantized \(DequantizeLinear\): fine-tune the float model, then quantize"
    ):
        trainable_weights(model)


def test_model_without_float_weights_is_refused(digits):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "weightless",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
    )
    with pytest.raises(GdwsError, match="no float weight"):
        finetune(helper.make_model(graph), digits, FinetuneOptions(steps=1))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "learning rate"),
        ({"momentum": 1.0}, "momentum"),
        ({"clean_share": 1.5}, "clean share"),
        ({"clean_share": 0.5, "attack": None}, "give one"),
        ({"attack": make_attacks("apgd-ce")[0]}, "PGD"),
    ],
)
def test_bad_options_are_refused(changes, message):
    with pytest.raises(GdwsError, match=message):
        FinetuneOptions(**changes)


def test_cli_finetunes_a_gdws_model_keeping_its_structure(tmp_path, capsys):
    converted, _ = gdws_deploy.convert(BUNDLED, mac_reduction=4)
    source = tmp_path / "cut.onnx"
    onnx.save(converted, str(source))
    digest = sha256(source)
    args = ["finetune", source, "--dataset", "photos:train", "--limit", "64", "--steps", "2"]
    result = run_cli(capsys, *args, "--batch-size", "32", "--attack-steps", "1", "--eps", "4/255")
    assert result.code == 0, result.err
    output = tmp_path / "cut.finetuned.onnx"
    assert f"wrote {output}" in result.out
    assert "2 steps x 32 samples of photos:train" in result.out
    assert sha256(source) == digest
    tuned = onnx.load(str(output))
    assert skeleton(tuned) == skeleton(converted)
    before, after = values(converted), values(tuned)
    for name, value in before.items():
        moved = not np.array_equal(value, after[name])
        assert moved == (value.dtype == np.float32), name  # Gather indices stay
    x = load_dataset("photos", limit=8).x
    assert ort_run(output, x).shape == (8, 10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "digits"], "dataset digits has images of shape (1, 8, 8)"),
        (["--dataset", "photos:train", "--lr", "fast"], "--lr must be a number"),
        (["--dataset", "photos:train", "--momentum", "1"], "momentum must be in [0, 1)"),
        (["--dataset", "photos:train", "--lr", "1e30"], "the loss diverged at step"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    source = tmp_path / "model.onnx"
    shutil.copyfile(BUNDLED, source)
    common = ["--limit", "16", "--steps", "2", "--attack-steps", "1", "--device", "cpu"]
    result = run_cli(capsys, "finetune", source, *args, *common)
    assert_one_line_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_cli_refuses_to_write_over_its_input(tmp_path, capsys):
    source = tmp_path / "model.onnx"
    shutil.copyfile(BUNDLED, source)
    digest = sha256(source)
    result = run_cli(capsys, "finetune", source, "-o", source, "--dataset", "photos:train")
    assert_one_line_error(result, "is the input file")
    assert sha256(source) == digest


def test_a_weight_that_never_reaches_the_output_is_left_as_it_was(digits):
    model = classifier()
    dead = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "dead.w")
    model.graph.initializer.append(dead)
    model.graph.node.append(helper.make_node("Conv", ["x", "dead.w"], ["unused"]))
    tuned, report = finetune(model, digits, FinetuneOptions(steps=2, batch_size=16))
    assert "dead.w" in report.tensors
    assert values(tuned)["dead.w"].tobytes() == dead.raw_data


def test_clean_share_one_trains_as_clean_training_does(digits):
    model = classifier()
    clean, _ = finetune(model, digits, FinetuneOptions(steps=3, batch_size=32, attack=None))
    mixed, _ = finetune(
        model, digits, FinetuneOptions(steps=3, batch_size=32, attack=PGD, clean_share=1.0)
    )
    adversarial, _ = finetune(model, digits, FinetuneOptions(steps=3, batch_size=32, attack=PGD))
    assert mixed.SerializeToString() == clean.SerializeToString()
    assert adversarial.SerializeToString() != clean.SerializeToString()
