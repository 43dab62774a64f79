"""Loading, checking, saving ONNX models; finding eligible Convs; counting MACs."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import (
    LoadedModel,
    check_and_infer,
    count_macs,
    external_data_path,
    load_model,
    save_model,
)
from gdws_deploy.passes.gdws.compression import GdwsPass
from tests.conv_models import ConvSpec, conv_chain


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def layers_of(model: onnx.ModelProto, **options) -> dict:
    """The model's Convs by name, as GDWS selects them."""
    return {layer.name: layer for layer in GdwsPass().select(analyze(model, **options)).convs}


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_chain([ConvSpec(8), ConvSpec(8)]), str(path))
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"this is a text file, not a model\n", "not a readable ONNX model"),
    ],
)
def test_unreadable_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(GdwsError, match=message):
        load_model(path)


def test_truncated_file_is_not_a_readable_model(model_file):
    model_file.write_bytes(model_file.read_bytes()[:-200])
    with pytest.raises(GdwsError, match="not a readable ONNX model"):
        load_model(model_file)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(GdwsError, match="not a file"):
        load_model(tmp_path)


def test_model_failing_the_checker_is_refused():
    model = conv_chain([ConvSpec(8)])
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(GdwsError, match=r"fails onnx\.checker"):
        check_and_infer(model)


def test_initializer_with_too_little_data_is_refused():
    model = conv_chain([ConvSpec(8)])
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]
    with pytest.raises(GdwsError, match=r"fails onnx\.checker.*conv0\.weight"):
        check_and_infer(model)


def test_shape_inference_types_every_intermediate_tensor():
    model = conv_chain([ConvSpec(8, strides=(2, 2), pads=(1, 1, 1, 1)), ConvSpec(6)])
    types = check_and_infer(model)
    assert types["conv0.out"].shape == ("batch", 8, 6, 6)
    assert types["conv1.act"].shape == ("batch", 6, 4, 4)
    assert types["conv0.weight"].shape == (8, 4, 3, 3)


def test_mac_counts_follow_the_inferred_shapes_at_batch_one():
    model = conv_chain(
        [ConvSpec(8, pads=(1, 1, 1, 1)), ConvSpec(6, kernel=(1, 3), strides=(2, 2))],
        input_shape=(4, 10, 10),
        dense_head=True,
    )
    types = check_and_infer(model)
    macs = count_macs(model, types)
    by_op = {model.graph.node[i].op_type + str(i): m for i, m in macs.items()}
    conv0 = 8 * 10 * 10 * 4 * 9  # M * H_out * W_out * C * k
    conv1 = 6 * 5 * 4 * 8 * 3  # stride 2, 1x3 kernel, no pads: 10x10 -> 5x4
    gemm = 10 * 6
    assert sorted(by_op.values()) == sorted([conv0, conv1, gemm])


def test_matmul_and_conv_transpose_macs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, None, None])
    up = numpy_helper.from_array(np.ones((2, 3, 2, 2), np.float32), "up")
    mix = numpy_helper.from_array(np.ones((10, 4), np.float32), "mix")
    nodes = [
        helper.make_node("ConvTranspose", ["x", "up"], ["u"], strides=[2, 2]),
        helper.make_node("MatMul", ["u", "mix"], ["m"]),
        helper.make_node("Slice", ["m", "starts", "ends", "axes"], ["y"]),
    ]
    bounds = {"starts": 0, "ends": 2, "axes": 1}
    limits = [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in bounds.items()]
    graph = helper.make_graph(nodes, "g", [x], [y], [up, mix, *limits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    macs = count_macs(model, check_and_infer(model))
    assert macs[0] == 2 * 5 * 5 * 3 * 2 * 2  # every input pixel feeds C_out * k outputs
    assert macs[1] == 3 * 10 * 4 * 10  # (n, 3, 10, 10) @ (10, 4) per sample


def test_skipped_convs_say_why():
    model = conv_chain(
        [
            ConvSpec(8, name="stem"),
            ConvSpec(8, group=2, name="grouped"),
            ConvSpec(8, kernel=(1, 1), name="pointwise"),
            ConvSpec(8, source="dequantize", name="quantized"),
            ConvSpec(8, source="input", name="dynamic"),
            ConvSpec(8, source="constant", name="constant"),
            ConvSpec(8, name="plain"),
        ],
        input_shape=(4, 16, 16),
    )
    layers = layers_of(model)
    reasons = {name: layer.skipped for name, layer in layers.items()}
    assert reasons["stem"].startswith("first conv")
    assert reasons["grouped"] == "grouped conv (group=2)"
    assert reasons["pointwise"].startswith("1x1 kernel")
    assert reasons["quantized"] == "quantized weight (DequantizeLinear)"
    assert reasons["dynamic"].startswith("weight is a graph input")
    assert reasons["constant"] is None and reasons["plain"] is None
    assert layers["constant"].weight.shape == (8, 8, 3, 3)
    assert layers["quantized"].weight_shape == (8, 8, 3, 3)


def test_first_conv_joins_with_all_layers_and_globs_select_by_name():
    model = conv_chain([ConvSpec(8, name=n) for n in ("stem", "block1/a", "block1/b", "block2/a")])
    assert layers_of(model, all_layers=True)["stem"].eligible
    chosen = layers_of(model, include=["block1/*"], exclude=["*/b"])
    assert [name for name, layer in chosen.items() if layer.eligible] == ["block1/a"]
    assert chosen["block1/b"].skipped == "excluded by --exclude"
    assert chosen["block2/a"].skipped == "not matched by --include"


def test_non_float_weight_and_1d_conv_are_skipped():
    bf16 = TensorProto.BFLOAT16
    inputs = [
        helper.make_tensor_value_info("x", bf16, ["n", 2, 9]),
        helper.make_tensor_value_info("x4", bf16, ["n", 2, 5, 5]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", bf16, ["n", 4, 7]),
        helper.make_tensor_value_info("y4", bf16, ["n", 4, 3, 3]),
    ]
    weights = [
        helper.make_tensor("w1", bf16, [4, 2, 3], np.ones(24, np.float32)),
        helper.make_tensor("w2", bf16, [4, 2, 3, 3], np.ones(72, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y"], name="line"),
        helper.make_node("Conv", ["x4", "w2"], ["y4"], name="brain"),
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers = layers_of(model, all_layers=True)
    assert layers["line"].skipped == "not a 2-D conv (weight rank 3)"
    assert layers["brain"].skipped == "weight type bfloat16 is not a float type"


def test_save_preserves_opset_ir_version_and_metadata(tmp_path, model_file):
    loaded = load_model(model_file)
    out = save_model(loaded.model, tmp_path / "copy.onnx", like=loaded)
    again = onnx.load(str(out))
    assert again.ir_version == loaded.model.ir_version == 8
    assert again.opset_import == loaded.model.opset_import
    assert {p.key: p.value for p in again.metadata_props} == {
        "author": "tests",
        "purpose": "fixture",
    }
    assert not external_data_path(out).exists()


def test_external_data_is_read_and_written_back_the_same_way(tmp_path):
    source = tmp_path / "big.onnx"
    onnx.save(
        conv_chain([ConvSpec(16), ConvSpec(16)]),
        str(source),
        save_as_external_data=True,
        location="big.weights",
        size_threshold=512,
    )
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    loaded = load_model(source)
    assert loaded.external_data and loaded.external_files == (tmp_path / "big.weights",)
    out = save_model(loaded.model, tmp_path / "out.onnx", like=loaded)
    assert external_data_path(out).stat().st_size > 16 * 16 * 9 * 4
    reloaded = load_model(out)
    assert reloaded.external_files == (external_data_path(out),)
    for a, b in zip(reloaded.model.graph.initializer, loaded.model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*before, "out.onnx", "out.onnx.data"]
    )


def test_missing_external_data_file_is_a_clear_error(tmp_path):
    source = tmp_path / "big.onnx"
    onnx.save(conv_chain([ConvSpec(16)]), str(source), save_as_external_data=True, location="w.bin")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(GdwsError, match="external data"):
        load_model(source)


def test_saving_never_overwrites_the_input_or_leaves_partial_files(tmp_path, model_file):
    loaded = load_model(model_file)
    original = digest(model_file)
    with pytest.raises(GdwsError, match="is the input file"):
        save_model(loaded.model, model_file, like=loaded)
    with pytest.raises(GdwsError, match="does not exist"):
        save_model(loaded.model, tmp_path / "missing" / "out.onnx", like=loaded)
    assert digest(model_file) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_loaded_model_without_path_is_saved_inline(tmp_path):
    model = conv_chain([ConvSpec(8)])
    out = save_model(model, tmp_path / "inline.onnx", like=LoadedModel(model))
    assert onnx.load(str(out)) == model
