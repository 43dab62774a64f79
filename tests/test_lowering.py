"""Lowerings, the tuner and their flags, on small real ONNX models run in onnxruntime."""

from __future__ import annotations

import json
from typing import Dict, List, Tuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gdws_deploy import convert
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import check_and_infer
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.passes.gdws.decompose import GdwsFactors, lego, mego
from gdws_deploy.passes.gdws.lowering import ALIGNED_LOWERINGS, LOWERINGS
from gdws_deploy.passes.gdws.rewrite import rewrite
from gdws_deploy.speed.backends import OrtBackend
from gdws_deploy.speed.cost_model import CostModel, LayerShape, LoweringForm
from gdws_deploy.speed.tune_cache import TuneCache
from tests.cli_run import assert_one_line_error, run_cli
from tests.conv_models import INPUT, OUTPUT, conv_weight, run

CHANNELS = 8
GDWS_FORMS = ("gather", "pad", "sum", "fold")


def chain_model(
    weights: str = "sparse", seed: int = 0, channels: int = CHANNELS
) -> onnx.ModelProto:
    """images -> c0 -> BN -> Relu -> c1 -> Relu -> MaxPool -> BN -> c2 -> BN -> PRelu -> c3
    -> Relu = t; scores = t + c4(t). c1, c2 and c3 can fold into their producers (c3's is
    itself a GDWS layer); c4 cannot, as t also feeds the Add."""
    rng = np.random.default_rng(seed)
    tensors, nodes = [], []

    def constant(name: str, value: np.ndarray) -> str:
        tensors.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv(name: str, source: str, in_channels: int) -> str:
        weight = conv_weight((channels, in_channels, 3, 3), weights, rng)
        inputs = [
            source,
            constant(f"{name}.w", weight),
            constant(f"{name}.b", rng.standard_normal(channels)),
        ]
        nodes.append(helper.make_node("Conv", inputs, [name], name=name, pads=[1, 1, 1, 1]))
        return name

    def batchnorm(name: str, source: str) -> str:
        params = [
            rng.uniform(0.5, 1.5, channels),
            rng.standard_normal(channels) * 0.1,
            rng.standard_normal(channels) * 0.1,
            rng.uniform(0.5, 2.0, channels),
        ]
        names = [constant(f"{name}.{i}", p) for i, p in enumerate(params)]
        nodes.append(helper.make_node("BatchNormalization", [source, *names], [name], name=name))
        return name

    def unary(op: str, source: str, **attrs) -> str:
        nodes.append(
            helper.make_node(op, [source], [f"{source}.{op}"], name=f"{source}.{op}", **attrs)
        )
        return f"{source}.{op}"

    h = unary("Relu", batchnorm("bn0", conv("c0", INPUT, 4)))
    h = unary(
        "MaxPool", unary("Relu", conv("c1", h, channels)), kernel_shape=[2, 2], strides=[2, 2]
    )
    h = batchnorm("bn1", h)  # not right after a conv: its parameters are gathered
    slope = constant("slope", rng.uniform(0.05, 0.3, (channels, 1, 1)))
    nodes.append(
        helper.make_node("PRelu", [batchnorm("bn2", conv("c2", h, channels)), slope], ["p"])
    )
    h = "p"
    t = unary("Relu", conv("c3", h, channels))
    nodes.append(helper.make_node("Add", [t, conv("c4", t, channels)], [OUTPUT], name="add"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["n", 4, 12, 12])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["n", channels, 6, 6])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def images(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((batch, 4, 12, 12)).astype(np.float32)


def gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def factored(model: onnx.ModelProto, factor) -> Tuple[list, Dict]:
    """Every conv (the first included) with its factors, and the inferred types."""
    analyzed = GdwsPass().select(analyze(model, all_layers=True))
    return [(layer, factor(layer.weight)) for layer in analyzed.convs], analyzed.types


def lowered(model: onnx.ModelProto, chosen, types, lowering: str) -> onnx.ModelProto:
    out = rewrite(model, chosen, types, LOWERINGS[lowering])
    onnx.checker.check_model(out, full_check=True)
    return out


def with_dense_weights(model: onnx.ModelProto, chosen: List[Tuple]) -> onnx.ModelProto:
    """The original graph with each conv's weight replaced by what its factors represent."""
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    weights = {t.name: t for t in dense.graph.initializer}
    for layer, factors in chosen:
        name = f"{layer.name}.w"
        weights[name].CopyFrom(numpy_helper.from_array(factors.to_dense().astype(np.float32), name))
    return dense


def ops(model: onnx.ModelProto) -> List[str]:
    return [node.op_type for node in model.graph.node]


def nodes_named(model: onnx.ModelProto) -> Dict[str, onnx.NodeProto]:
    return {node.name: node for node in model.graph.node}


def weight_of(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    tensors = {t.name: t for t in model.graph.initializer}
    return numpy_helper.to_array(tensors[node.input[1]])


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module")
def sparse_model() -> onnx.ModelProto:
    return chain_model("sparse")


@pytest.fixture(scope="module")
def exact(sparse_model):
    """beta = 0 on weights whose every third input channel is zero: those channels drop."""
    chosen, types = factored(sparse_model, lambda w: lego(w, 0.0))
    return chosen, types, {name: lowered(sparse_model, chosen, types, name) for name in LOWERINGS}


@pytest.mark.parametrize("lowering", GDWS_FORMS)
def test_beta_zero_is_exact_in_every_lowering_on_layers_with_dead_channels(
    sparse_model, exact, lowering
):
    chosen, _, models = exact
    assert all(f.kernels < f.in_channels * 8 for _, f in chosen)  # dead channels dropped
    expected = run(sparse_model, images())
    assert gap(expected, run(models[lowering], images())) <= 1e-4
    assert gap(run(models["gather"], images()), run(models[lowering], images())) <= 1e-5


@pytest.mark.parametrize("weights", ["random", "rank2"])
@pytest.mark.parametrize("lowering", GDWS_FORMS)
def test_every_lowering_computes_the_dense_weight_its_factors_represent(weights, lowering):
    model = chain_model(weights, seed=1)
    chosen, types = factored(model, lambda w: mego(w, 13))
    reference = run(with_dense_weights(model, chosen), images())
    assert gap(reference, run(model, images())) > 1e-3  # lossy: the check can tell
    assert gap(reference, run(lowered(model, chosen, types, lowering), images())) <= 1e-5
    gathered = run(lowered(model, chosen, types, "gather"), images())
    assert gap(gathered, run(lowered(model, chosen, types, lowering), images())) <= 1e-5


@pytest.mark.parametrize("lowering", ["gather", "fold"])
def test_aligned_forms_gather_a_multiple_of_eight_kernels_exactly(lowering):
    model = chain_model("random", seed=5)
    chosen, types = factored(model, lambda w: mego(w, 13))
    out = rewrite(model, chosen, types, ALIGNED_LOWERINGS[lowering])
    onnx.checker.check_model(out, full_check=True)
    depthwise = [n for n in out.graph.node if n.name.endswith("/gdws_dw")]
    assert len(depthwise) == 5
    assert all(weight_of(out, node).shape[0] == 16 for node in depthwise)  # 13 -> 16
    reference = run(with_dense_weights(model, chosen), images())
    assert gap(reference, run(out, images())) <= 1e-5


def test_fold_removes_every_gather_where_the_producer_chain_allows_it(exact):
    chosen, _, models = exact
    folded, gathered = models["fold"], models["gather"]
    kernels = {layer.name: f.kernels for layer, f in chosen}
    gathers = sorted(n.name for n in folded.graph.node if n.op_type == "Gather")
    # c0 reads the graph input and c4's input t also feeds the Add: both keep their Gather
    assert gathers == ["c0/gdws_gather", "c4/gdws_gather"]
    assert len([op for op in ops(gathered) if op == "Gather"]) == 5
    nodes = nodes_named(folded)
    # each producer emits the channels its consumer's depthwise kernels read, in order
    assert weight_of(folded, nodes["c0/gdws_pw"]).shape[0] == kernels["c1"]
    assert weight_of(folded, nodes["c1/gdws_pw"]).shape[0] == kernels["c2"]
    assert weight_of(folded, nodes["c2/gdws_pw"]).shape[0] == kernels["c3"]
    assert attrs(nodes["c3/gdws_dw"])["group"] == kernels["c3"]
    # bn0 folded into c0 and bn2 into c2; bn1 (after a pool) now has c2's kernel count
    assert ops(folded).count("BatchNormalization") == 1
    bn1 = nodes_named(folded)["bn1"]
    assert weight_of(folded, bn1).shape == (kernels["c2"],)


def test_fold_with_one_kernel_per_channel_makes_producers_emit_fewer_channels():
    model = chain_model("rank1", seed=2, channels=24)
    dropped = list(range(0, 24, 3))  # 16 channels keep one kernel each
    chosen, types = factored(model, lambda w: GdwsFactors(**_drop_channels(lego(w, 1e-6), dropped)))
    folded = lowered(model, chosen, types, "fold")
    nodes = nodes_named(folded)
    assert weight_of(folded, nodes["c0/gdws_pw"]).shape[0] == 16
    assert "Gather" in ops(folded) and "c4/gdws_gather" in nodes
    reference = run(with_dense_weights(model, chosen), images())
    assert gap(reference, run(folded, images())) <= 1e-5


def _drop_channels(factors: GdwsFactors, channels: List[int]) -> dict:
    """The factors without the kernels of `channels` (rank-1 weights at a tiny beta keep
    one kernel per channel: the other terms are float rounding)."""
    keep = ~np.isin(factors.channels, channels)
    return dict(
        channels=factors.channels[keep],
        depthwise=factors.depthwise[keep],
        pointwise=factors.pointwise[:, keep],
        error=0.0,
        in_channels=factors.in_channels,
    )


def test_pad_needs_no_gather_and_runs_plain_depthwise_slices(exact):
    chosen, _, models = exact
    padded = models["pad"]
    assert "Gather" not in ops(padded)
    for layer, factors in chosen:
        slices = int(factors.kernels_per_channel().max())
        names = [f"{layer.name}/gdws_dw{j}" for j in range(slices)] if slices > 1 else []
        depthwise = [n for n in padded.graph.node if n.name.startswith(f"{layer.name}/gdws_dw")]
        assert sorted(n.name for n in depthwise) == sorted(names or [f"{layer.name}/gdws_dw"])
        for node in depthwise:
            assert attrs(node)["group"] == factors.in_channels
            assert weight_of(padded, node).shape == (factors.in_channels, 1, 3, 3)
        pointwise = nodes_named(padded)[f"{layer.name}/gdws_pw"]
        assert weight_of(padded, pointwise).shape[1] == slices * factors.in_channels


def test_dense_keeps_every_conv_as_it_was(sparse_model, exact):
    _, _, models = exact
    dense = models["dense"]
    assert ops(dense) == ops(sparse_model)
    assert [n.name for n in dense.graph.node] == [n.name for n in sparse_model.graph.node]
    np.testing.assert_array_equal(run(dense, images()), run(sparse_model, images()))


def test_convert_reports_the_lowering_of_every_layer():
    model = chain_model("sparse", seed=3)
    _, report = convert(model, beta=0.0, lowering="fold", all_layers=True)
    forms = {row.name: row.lowering for row in report.layers}
    assert forms == {"c0": "gather", "c1": "fold", "c2": "fold", "c3": "fold", "c4": "gather"}
    assert report.parity <= 1e-4 and report.lowering == "fold"
    _, untuned = convert(chain_model("rank1", seed=3), budget=8, all_layers=True)
    assert {row.name: row.lowering for row in untuned.layers}["c1"] == "fold"


def tuning_model() -> onnx.ModelProto:
    """A 64-channel 32x32 conv GDWS should beat by far, and an 8-channel 4x4 conv whose
    GDWS form has barely fewer MACs than the conv (three nodes instead of one)."""
    rng = np.random.default_rng(4)
    spec = [("big_in", 8, 64, 32), ("big", 64, 64, 32), ("small_in", 64, 8, 4), ("small", 8, 8, 4)]
    nodes, tensors, source = [], [], INPUT
    for name, c, m, _ in spec:
        weight = rng.standard_normal((m, c, 3, 3)).astype(np.float32)
        tensors.append(numpy_helper.from_array(weight, f"{name}.w"))
        nodes.append(
            helper.make_node("Conv", [source, f"{name}.w"], [name], name=name, pads=[1] * 4)
        )
        if name == "big":
            nodes.append(
                helper.make_node("MaxPool", [name], ["pooled"], kernel_shape=[8, 8], strides=[8, 8])
            )
            source = "pooled"
        else:
            source = name
    graph = helper.make_graph(
        nodes,
        "tuning",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["n", 8, 32, 32])],
        [helper.make_tensor_value_info(source, TensorProto.FLOAT, ["n", 8, 4, 4])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_auto_never_picks_a_form_measured_slower_than_dense(tmp_path):
    cache = tmp_path / "tune.json"
    converted, report = convert(
        tuning_model(), budget=32, all_layers=True, tune=OrtBackend(1), tune_cache=cache
    )
    rows = {row.name: row for row in report.layers}
    assert all(row.speedup is not None and row.lowering for row in rows.values())
    for row in rows.values():
        assert row.speedup >= 1.0 or row.lowering == "dense"  # dense's own ratio is 1
    timed = {row.name: (row.lowering, row.speedup, row.skipped) for row in rows.values()}
    assert rows["big"].lowering in GDWS_FORMS and rows["big"].speedup > 2, timed
    # Which small layers lose to dense depends on the machine's timings; what a dense
    # choice must look like does not.
    kept = [row for row in rows.values() if row.lowering == "dense"]
    assert all(row.skipped.startswith("kept dense") for row in kept), timed
    assert all(row.macs_after == row.macs_before for row in kept), timed
    nodes = [n.name for n in converted.graph.node]
    assert all(row.name in nodes for row in kept), timed
    assert report.measured_speedup > 1.0 and report.tuned.endswith("batch 1"), timed
    stored = json.loads(cache.read_text())["seconds"]
    assert any("conv 64x64x3x3 on 32x32" in key for key in stored)
    assert all(key.startswith("onnxruntime-") and " | batch 1 | " in key for key in stored)
    before = cache.read_bytes()
    convert(tuning_model(), budget=32, all_layers=True, tune=OrtBackend(1), tune_cache=cache)
    assert cache.read_bytes() == before  # every layer time came from the cache


def test_tune_cache_round_trips_and_is_keyed_by_layer_shape(tmp_path):
    model = tuning_model()
    types = check_and_infer(model)
    shapes = {node.name: LayerShape.of(node, types) for node in model.graph.node[:2]}
    path = tmp_path / "cache.json"
    costs = CostModel(OrtBackend(1), batch=1, cache=TuneCache(path))
    costs.calibrate(shapes["big"], ["pad"])
    measured = dict(costs.cache.seconds)
    assert len(measured) == 5  # context, dense, pad at 1, 2 and 4 slices
    same_shape = LayerShape.of(_renamed(model.graph.node[1], "other"), types)
    costs.calibrate(same_shape, ["pad"])
    assert costs.cache.seconds == measured  # a layer of the same shape is not timed again
    costs.calibrate(shapes["big_in"], ["pad"])
    assert len(costs.cache.seconds) == 10
    costs.cache.save()
    assert TuneCache(path).seconds == costs.cache.seconds
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary left
    assert costs.seconds(shapes["big"], LoweringForm("pad", 64, 1)) > 0


def _renamed(node: onnx.NodeProto, name: str) -> onnx.NodeProto:
    other = onnx.NodeProto()
    other.CopyFrom(node)
    other.name = name
    return other


def test_a_broken_tune_cache_is_one_clear_error(tmp_path):
    for text, message in [
        ("{not json", "cannot read tune cache"),
        (json.dumps({"format": "other"}), "is not a gdws-deploy tune cache"),
        (json.dumps({"format": "gdws-deploy tune cache", "version": 9}), "of version 9"),
        (
            json.dumps({"format": "gdws-deploy tune cache", "version": 1, "seconds": {"k": -1}}),
            "positive numbers",
        ),
    ]:
        (tmp_path / "cache.json").write_text(text)
        with pytest.raises(GdwsError, match=message):
            TuneCache(tmp_path / "cache.json")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(chain_model(), str(path))
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lowering", "gathered"], "Invalid value for '--lowering'"),
        (["--tune", "gpu"], "Invalid value for '--tune'"),
        (["--tune", "ort", "--tune-batch", "0"], "tune batch must be a whole number >= 1"),
        (["--tune", "ort", "--tune-batch", "two"], "--tune-batch must be a number"),
        (["--tune", "ort", "--tune-threads", "-1"], "threads must be a whole number >= 0"),
        (["--tune-threads", "2"], "--tune-threads needs --tune ort"),
        (["--tune-batch", "8"], "needs a backend to tune on: give --tune ort|trt"),
        (["--tune", "ort", "--lowering", "pad"], "use it with lowering auto, not pad"),
    ],
)
def test_bad_lowering_and_tune_flags_are_one_line_errors(capsys, model_file, flags, message):
    result = run_cli(capsys, "convert", model_file, "--beta", "0", *flags)
    assert_one_line_error(result, message)
    assert not model_file.with_name("chain.gdws.onnx").exists()


def test_a_corrupt_tune_cache_file_is_a_one_line_error(capsys, model_file, tmp_path):
    (tmp_path / "cache.json").write_text("[1, 2")
    args = ["--tune", "ort", "--tune-cache", tmp_path / "cache.json"]
    result = run_cli(capsys, "convert", model_file, "--beta", "0", *args)
    assert_one_line_error(result, "cannot read tune cache")
