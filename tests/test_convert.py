"""The convert API end to end on small real ONNX models, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gdws_deploy import convert
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import check_and_infer, count_macs, external_data_path
from gdws_deploy.passes.gdws.decompose import SpectraCache
from gdws_deploy.pipeline.convert import convert_file
from tests.conv_models import INPUT, OUTPUT, ConvSpec, conv_chain, conv_weight, node_names, run

# Every way a Conv can place its kernels, all with exactly low-rank ("sparse") weights.
SHAPES = [
    ConvSpec(8, pads=(1, 1, 1, 1), name="plain"),
    ConvSpec(6, dilations=(2, 2), pads=(2, 2, 2, 2), name="dilated"),
    ConvSpec(8, strides=(2, 2), pads=(0, 1, 1, 2), bias=False, name="strided_asym"),
    ConvSpec(8, kernel=(3, 5), auto_pad="SAME_UPPER", source="constant", name="same_upper_3x5"),
    ConvSpec(6, kernel=(1, 3), pads=(0, 1, 0, 1), name="row_1x3"),
    ConvSpec(6, kernel=(5, 1), strides=(1, 2), name="column_5x1"),
]


def batch(shape=(3, 4, 16, 16), seed=7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def initializers(model: onnx.ModelProto) -> dict:
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return tensors


def dense_equivalent(converted: onnx.ModelProto, name: str, channels: int) -> np.ndarray:
    """Rebuild the (M, C, kh, kw) weight a rewritten layer computes, from its nodes."""
    nodes = {node.name: node for node in converted.graph.node}
    tensors = initializers(converted)
    depthwise = tensors[nodes[f"{name}/gdws_dw"].input[1]][:, 0]
    pointwise = tensors[nodes[f"{name}/gdws_pw"].input[1]][:, :, 0, 0]
    if f"{name}/gdws_gather" in nodes:
        sources = tensors[nodes[f"{name}/gdws_gather"].input[1]]
    else:
        sources = np.repeat(np.arange(channels), depthwise.shape[0] // channels)
    one_hot = np.eye(channels)[sources]  # (G, C)
    return np.einsum("mg,gc,ghw->mchw", pointwise, one_hot, depthwise)


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def shapes_model() -> onnx.ModelProto:
    return conv_chain(SHAPES, input_shape=(4, 16, 16), dense_head=True)


@pytest.fixture(scope="module")
def shapes_converted(shapes_model):
    return convert(shapes_model, beta=0.0, all_layers=True)


def test_beta_zero_rewrites_every_conv_shape_with_exact_parity(shapes_model, shapes_converted):
    converted, report = shapes_converted
    onnx.checker.check_model(converted, full_check=True)
    assert report.parity is not None and report.parity <= 1e-4
    assert relative_gap(run(shapes_model, batch()), run(converted, batch())) <= 1e-4
    rows = {row.name: row for row in report.layers}
    for spec in SHAPES:
        channels = rows[spec.name].weight_shape[1]
        alive = len(range(0, channels, 3))  # sparse weights: every third channel is nonzero
        assert rows[spec.name].kernels == alive * min(spec.out, spec.kernel[0] * spec.kernel[1])
        assert rows[spec.name].error == 0.0
        assert rows[spec.name].macs_after < rows[spec.name].macs_before
    assert report.converted == len(SHAPES)


def test_rewritten_nodes_keep_names_attributes_and_model_fields(shapes_model, shapes_converted):
    converted, _ = shapes_converted
    names = node_names(converted)
    original = {node.name: node for node in shapes_model.graph.node}
    nodes = {node.name: node for node in converted.graph.node}
    for spec in SHAPES:
        assert spec.name not in names
        assert {f"{spec.name}/gdws_dw", f"{spec.name}/gdws_pw"} <= set(names)
        spatial = {k: v for k, v in attrs(original[spec.name]).items() if k != "group"}
        depthwise = attrs(nodes[f"{spec.name}/gdws_dw"])
        assert {k: v for k, v in depthwise.items() if k != "group"} == spatial
        pointwise = nodes[f"{spec.name}/gdws_pw"]
        assert pointwise.output[0] == original[spec.name].output[0]
        assert pointwise.input[2:] == original[spec.name].input[2:]  # the original bias
    assert [i.name for i in converted.graph.input] == [INPUT]
    assert [o.name for o in converted.graph.output] == [OUTPUT]
    assert converted.ir_version == shapes_model.ir_version
    assert converted.opset_import == shapes_model.opset_import
    assert converted.metadata_props == shapes_model.metadata_props
    assert converted.producer_name == shapes_model.producer_name
    typed = {info.name for info in converted.graph.value_info}
    assert {"plain/gdws_dw/output", "plain/gdws_gather/output", "plain.out"} <= typed


def test_graphsurgeon_does_not_leak_and_input_model_is_untouched(shapes_model):
    before = shapes_model.SerializeToString()
    converted, _ = convert(shapes_model, beta=0.0, all_layers=True, check_parity=False)
    assert shapes_model.SerializeToString() == before
    assert type(converted) is onnx.ModelProto
    tensor_names = [t.name for t in converted.graph.initializer] + node_names(converted)
    assert not [n for n in tensor_names if "onnx_graphsurgeon" in n or n.startswith("gs_")]
    assert [o.domain for o in converted.opset_import] == [""]


def test_gather_only_when_channels_keep_unequal_kernel_counts(shapes_converted):
    converted, report = shapes_converted
    gather = next(n for n in converted.graph.node if n.name == "plain/gdws_gather")
    indices = initializers(converted)[gather.input[1]]
    assert indices.dtype == np.int64
    assert np.array_equal(np.unique(indices), [0, 3])  # the live channels of 4, sorted
    assert attrs(gather) == {"axis": 1}

    model = conv_chain([ConvSpec(8, weights="rank2"), ConvSpec(6, weights="rank1")], (4, 10, 10))
    converted, report = convert(model, budget=8, all_layers=True)
    nodes = {node.name: node for node in converted.graph.node}
    assert not [name for name in nodes if name.endswith("gdws_gather")]
    assert attrs(nodes["conv0/gdws_dw"])["group"] == 4  # channel multiplier 2 on 4 channels
    assert attrs(nodes["conv1/gdws_dw"])["group"] == 8  # one kernel per channel: depthwise
    for name in ("conv0", "conv1"):
        assert initializers(converted)[nodes[f"{name}/gdws_dw"].input[1]].shape == (8, 1, 3, 3)
    assert [row.kernels for row in report.layers] == [8, 8]
    assert report.parity < 1e-4  # rank-limited weights: dropped terms are rounding noise


def test_lossy_factors_compute_exactly_the_dense_weight_they_represent():
    specs = [ConvSpec(12, weights="random", name=f"c{i}") for i in range(4)]
    model = conv_chain(specs, input_shape=(5, 10, 10))
    converted, report = convert(model, mac_reduction=1.6, all_layers=True)
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    weights = {t.name: t for t in expected.graph.initializer}
    rewritten = [row for row in report.layers if row.kernels is not None]
    assert len(rewritten) >= 2
    for row in rewritten:
        original = numpy_helper.to_array(weights[f"{row.name}.weight"])
        dense = dense_equivalent(converted, row.name, original.shape[1])
        assert ((original - dense) ** 2).sum() == pytest.approx(row.error, rel=1e-4)
        weights[f"{row.name}.weight"].CopyFrom(
            numpy_helper.from_array(dense.astype(np.float32), f"{row.name}.weight")
        )
    x = batch((2, 5, 10, 10))
    assert relative_gap(run(expected, x), run(converted, x)) < 1e-5
    assert report.parity > 1e-3  # lossy, and the report says so


def test_mac_reduction_reaches_the_target_counted_on_the_output():
    specs = [ConvSpec(16, weights="random", pads=(1, 1, 1, 1)) for _ in range(5)]
    model = conv_chain(specs, input_shape=(8, 12, 12), dense_head=True)
    converted, report = convert(model, mac_reduction=2.0)
    assert report.reduction >= 2.0
    types = check_and_infer(converted)
    assert sum(count_macs(converted, types).values()) == report.macs_after
    assert sum(count_macs(model, check_and_infer(model)).values()) == report.macs_before
    assert report.layers[0].skipped.startswith("first conv")
    with pytest.raises(GdwsError, match="cannot reach"):
        convert(model, mac_reduction=50.0, check_parity=False)


def test_budget_caps_every_layer_and_unprofitable_layers_stay_dense_saying_why():
    specs = [ConvSpec(1, weights="random"), ConvSpec(2, weights="random"), ConvSpec(16)]
    converted, report = convert(conv_chain(specs, (1, 8, 8)), budget=5, all_layers=True)
    single, small, big = report.layers
    assert big.kernels == 5 and big.error > 0
    # 1 -> 1 channel: one kernel costs 9 + 1 MACs per pixel, more than 9 dense
    assert single.kernels is None and single.skipped == "GDWS form would not reduce its MACs"
    # 1 -> 2 channels: one kernel (9 + 2) would pay, the 2 budget=5 keeps (22) do not (18)
    assert small.kernels is None
    assert small.skipped == "the kernels budget=5 keeps cost no fewer MACs than the dense conv"
    assert {"conv0", "conv1"} <= set(node_names(converted))


def test_allocation_says_it_left_a_layer_dense():
    specs = [ConvSpec(16, weights=w, pads=(1, 1, 1, 1)) for w in ("random", "random", "rank2")]
    _, report = convert(conv_chain(specs, (8, 8, 8)), mac_reduction=1.1, check_parity=False)
    _, full_rank, low_rank = report.layers
    assert full_rank.skipped == (
        "left dense by the allocation (dense is cheaper than the kernels it was given)"
    )
    assert low_rank.kernels == 2 * 16 and report.reduction >= 1.1


def test_mac_reduction_one_is_met_by_the_original_and_changes_nothing():
    model = conv_chain([ConvSpec(16, weights="random", pads=(1, 1, 1, 1)) for _ in range(3)])
    cache = SpectraCache()
    converted, report = convert(model, mac_reduction=1.0, spectra_cache=cache)
    assert converted is model and report.already_met and cache.computed == 0
    assert report.converted == 0 and report.reduction == 1.0 and report.parity is None
    assert [row.skipped for row in report.layers][1:] == ["target already met"] * 2


def test_convert_file_writes_its_output_or_raises(tmp_path):
    """Returned means written: the rewrite, or the source unchanged when it meets the
    target; a run that cannot move toward its target raises and writes nothing."""
    source, output = tmp_path / "net.onnx", tmp_path / "out.onnx"
    onnx.save(conv_chain([ConvSpec(8, weights="random"), ConvSpec(8)]), str(source))
    report, rewritten = convert_file(source, output, budget=4)
    assert rewritten and report.converted == 1 and output.exists()
    output.unlink()
    report, rewritten = convert_file(source, output, mac_reduction=1.0)
    assert not rewritten and report.already_met
    assert onnx.load(str(output)).SerializeToString() == onnx.load(str(source)).SerializeToString()
    output.unlink()
    with pytest.raises(GdwsError, match="no Conv was rewritten at beta=0"):
        convert_file(source, output, beta=0.0, include=["conv0"], all_layers=True)
    with pytest.raises(GdwsError, match="--include matched no Conv"):
        convert_file(source, output, beta=0.0, include=["head"])
    assert not output.exists()


def test_nothing_to_convert_returns_the_original_model():
    model = conv_chain([ConvSpec(8, weights="random"), ConvSpec(8, weights="random")])
    converted, report = convert(model, beta=0.0)
    assert converted is model
    assert report.converted == 0 and report.parity is None
    assert report.macs_after == report.macs_before and report.reduction == 1.0
    assert report.layers[1].skipped.startswith("the kernels beta=0 keeps cost no fewer MACs")


def test_grouped_and_quantized_convs_are_left_as_they_are():
    specs = [
        ConvSpec(8, name="stem"),
        ConvSpec(8, group=4, weights="random", name="grouped", pads=(1, 1, 1, 1)),
        ConvSpec(8, source="dequantize", name="quantized", pads=(1, 1, 1, 1)),
        ConvSpec(8, name="plain"),
    ]
    model = conv_chain(specs, input_shape=(4, 12, 12))
    converted, report = convert(model, beta=0.0)
    reasons = {row.name: row.skipped for row in report.layers}
    assert reasons["grouped"] == "grouped conv (group=4)"
    assert reasons["quantized"] == "quantized weight (DequantizeLinear)"
    assert {"stem", "grouped", "quantized", "quantized.dq", "plain/gdws_pw"} <= set(
        node_names(converted)
    )
    assert report.parity <= 1e-4


def test_alphas_steer_kernels_and_must_match_every_layer(tmp_path):
    model = conv_chain([ConvSpec(8, weights="random"), ConvSpec(8, weights="random")])
    path = tmp_path / "alphas.npz"
    np.savez(path, conv0=np.ones(4), conv1=np.array([0, 1, 1, 1, 1, 1, 1, 1.0]), __samples=200)
    converted, report = convert(model, budget=16, alphas=path, all_layers=True)
    assert [row.kernels for row in report.layers] == [16, 16]
    assert not dense_equivalent(converted, "conv1", 8)[:, 0].any()  # alpha 0: no kernel
    assert dense_equivalent(converted, "conv0", 4)[:, 0].any()
    with pytest.raises(GdwsError, match="no entry for Conv 'conv0'"):
        convert(model, budget=16, alphas={"conv1": np.ones(8)}, all_layers=True)
    with pytest.raises(GdwsError, match=r"shape \(3,\), expected \(4,\)"):
        convert(
            model, budget=16, alphas={"conv0": np.ones(3), "conv1": np.ones(8)}, all_layers=True
        )
    (tmp_path / "broken.npz").write_bytes(b"not a zip archive")
    with pytest.raises(GdwsError, match="cannot read alphas"):
        convert(model, budget=16, alphas=tmp_path / "broken.npz")


@pytest.mark.parametrize(
    "targets",
    [
        {},
        {"beta": 0.1, "budget": 4},
        {"beta": 0.0, "mac_reduction": 2.0},
        {"beta": -1.0},
        {"beta": float("nan")},
        {"mac_reduction": 0.5},
        {"budget": 0},
        {"budget": 2.5},
    ],
)
def test_exactly_one_valid_target_is_required(targets):
    with pytest.raises(GdwsError):
        convert(conv_chain([ConvSpec(8)]), **targets)


def test_progress_reports_each_factored_layer():
    calls = []
    model = conv_chain([ConvSpec(8, name=n) for n in ("a", "b", "c")])
    convert(model, beta=0.0, check_parity=False, progress=lambda *call: calls.append(call))
    assert calls == [(1, 2, "b"), (2, 2, "c")]


def test_convert_file_announces_each_stage_in_order(tmp_path):
    source, output = tmp_path / "net.onnx", tmp_path / "out.onnx"
    onnx.save(conv_chain([ConvSpec(8, name=n) for n in ("a", "b", "c")]), str(source))
    stages = []
    convert_file(source, output, beta=0.0, stage=stages.append)
    assert stages == [
        f"loading {source}",
        "factoring 2 Conv(s)",
        "rewriting",
        "checking parity in onnxruntime",
        f"saving {output}",
    ]


def test_convert_file_keeps_external_data_and_the_input_bytes(tmp_path):
    source = tmp_path / "model.onnx"
    model = conv_chain([ConvSpec(16, pads=(1, 1, 1, 1)) for _ in range(3)], (4, 8, 8))
    stored = onnx.ModelProto()
    stored.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
    onnx.save(stored, str(source), save_as_external_data=True, location="model.bin")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report, written = convert_file(source, tmp_path / "out.onnx", beta=0.0)
    assert written and report.converted == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    assert external_data_path(tmp_path / "out.onnx").exists()
    reloaded = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(reloaded, full_check=True)
    assert relative_gap(run(model, batch((2, 4, 8, 8))), run(reloaded, batch((2, 4, 8, 8)))) < 1e-4


def test_dynamic_image_size_converts_and_checks_parity():
    model = conv_chain([ConvSpec(8), ConvSpec(8)], input_shape=(4, 12, 12))
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("h", "w")):
        dim.dim_param = name  # fully convolutional: any image size
    converted, report = convert(model, beta=0.0)
    assert report.converted == 1 and report.parity <= 1e-4
    onnx.checker.check_model(converted, full_check=True)
    assert (
        relative_gap(run(model, batch((1, 4, 20, 9))), run(converted, batch((1, 4, 20, 9)))) < 1e-4
    )


def test_beta_zero_parity_beyond_the_limit_fails_the_call():
    """float16 factors round to ~3e-4: beta = 0 promises 1e-4, so the call must refuse."""
    weight = conv_weight((8, 6, 3, 3), "sparse", np.random.default_rng(0)).astype(np.float16)
    half = onnx.TensorProto.FLOAT16
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="c")],
        "fp16",
        [onnx.helper.make_tensor_value_info("x", half, ["n", 6, 10, 10])],
        [onnx.helper.make_tensor_value_info("y", half, ["n", 8, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(GdwsError, match="parity check failed: at beta=0"):
        convert(model, beta=0.0, all_layers=True)
    converted, report = convert(model, beta=0.0, all_layers=True, check_parity=False)
    assert report.converted == 1 and report.parity is None
    factors = [t for t in converted.graph.initializer if t.name.endswith("/weight")]
    assert [t.data_type for t in factors] == [half, half]  # cast back to the weight's dtype


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_exported_network_converts_with_exact_parity(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, stride=2, padding=2, dilation=2, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, (1, 3), padding=(0, 1)),
    ).eval()
    with torch.no_grad():
        for conv in (net[3], net[6]):
            conv.weight[:, 1::2] = 0  # half the input channels dead: exactly low rank
        net[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, 16, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    converted, report = convert(path, beta=0.0)
    assert report.converted == 2 and report.parity <= 1e-4
    onnx.checker.check_model(converted, full_check=True)
    assert [i.name for i in converted.graph.input] == ["x"]


def test_package_level_convert_is_the_api_whatever_was_imported_first():
    import gdws_deploy
    import gdws_deploy.pipeline.convert as module

    model = conv_chain([ConvSpec(8), ConvSpec(8)])
    by_package = gdws_deploy.convert(model, beta=0.0, check_parity=False)[1]
    by_module = module.convert(model, beta=0.0, check_parity=False)[1]
    assert by_package == by_module and by_package.converted == 1
