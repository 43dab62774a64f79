"""The CompressionPass interface: a second pass, defined here, runs end to end through the
same pipeline as GDWS (registry, selection, plan, write, verify, parity, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import AnalyzedModel, analyze
from gdws_deploy.ir.graph import ConvLayer, check_and_infer, count_macs
from gdws_deploy.ir.parity import max_relative_deviation
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes import registry
from gdws_deploy.passes.base import CompressionPass, LayerOption
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.pipeline.convert import convert, convert_file
from tests.conv_models import ConvSpec, conv_chain, mixed_chain


class FilterRank1Pass(CompressionPass):
    """Each Conv's (M, C*kh*kw) weight cut to its best rank-1 approximation s u v^T,
    written as a one-filter Conv (v) and a 1x1 Conv spreading it to M outputs (s u)."""

    name = "rank1"
    label = "rank-1"

    def why_not(self, layer: ConvLayer) -> Optional[str]:
        return None if layer.group == 1 and len(layer.weight_shape) == 4 else "not a plain conv"

    def plan(
        self, analyzed: AnalyzedModel, layers: Sequence[ConvLayer], options: ConvertOptions
    ) -> Dict[int, LayerOption]:
        planned = {}
        for layer in layers:
            out, taps = layer.weight_shape[0], int(np.prod(layer.weight_shape[1:]))
            u, s, vt = np.linalg.svd(layer.weight.reshape(out, taps), full_matrices=False)
            macs = layer.pixels * (taps + out)
            if macs < layer.macs:
                error = float(np.sum(s[1:].astype(np.float64) ** 2))
                planned[layer.index] = LayerOption((u[:, 0] * s[0], vt[0]), macs, error, 1, "r1")
        return planned

    def write(self, analyzed: AnalyzedModel, chosen: Mapping[int, LayerOption]) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(analyzed.model)
        nodes = []
        for index, node in enumerate(analyzed.model.graph.node):
            if index not in chosen:
                nodes.append(node)
                continue
            column, row = chosen[index].factors
            shape = analyzed.types[node.input[1]].shape
            names = (f"{node.name}/filter", f"{node.name}/spread", f"{node.name}/rank1")
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(row.reshape(1, *shape[1:]), names[0]),
                    numpy_helper.from_array(column.reshape(-1, 1, 1, 1), names[1]),
                ]
            )
            first = helper.make_node("Conv", [node.input[0], names[0]], [names[2]], names[0])
            first.attribute.extend(node.attribute)
            bias = list(node.input[2:3])
            nodes.append(first)
            nodes.append(
                helper.make_node("Conv", [names[2], names[1], *bias], node.output, names[1])
            )
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
        return model


@pytest.fixture
def rank1(monkeypatch):
    """FilterRank1Pass registered as "rank1" for the test."""
    monkeypatch.setitem(registry.PASSES, FilterRank1Pass.name, FilterRank1Pass())


def model_with_three_convs() -> onnx.ModelProto:
    specs = [
        ConvSpec(8, name="stem"),
        ConvSpec(16, weights="random", pads=(1, 1, 1, 1), name="middle"),
        ConvSpec(16, group=2, name="grouped"),
        ConvSpec(12, weights="random", strides=(2, 2), name="last"),
    ]
    return conv_chain(specs, input_shape=(4, 16, 16))


def rank1_reconstruction(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """`model` with the named Convs' weights replaced by their numpy rank-1 truncations."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name.split(".")[0] in names and tensor.name.endswith(".weight"):
            weight = numpy_helper.to_array(tensor)
            matrix = weight.reshape(weight.shape[0], -1).astype(np.float64)
            u, s, vt = np.linalg.svd(matrix, full_matrices=False)
            truncated = (s[0] * np.outer(u[:, 0], vt[0])).reshape(weight.shape)
            tensor.CopyFrom(numpy_helper.from_array(truncated.astype(weight.dtype), tensor.name))
    return out


def test_a_second_pass_converts_end_to_end_through_the_registry(rank1):
    model = model_with_three_convs()
    converted, report = convert(model, ConvertOptions(budget=1, method="rank1"))
    rows = {row.name: row for row in report.layers}
    assert rows["stem"].skipped.startswith("first conv")
    assert rows["grouped"].skipped == "not a plain conv"  # the pass's own reason
    layers = {layer.name: layer for layer in analyze(model).convs}
    for name in ("middle", "last"):
        out, channels, kh, kw = layers[name].weight_shape
        assert rows[name].macs_after == layers[name].pixels * (channels * kh * kw + out)
        assert rows[name].kernels == 1 and rows[name].lowering == "r1"
    assert report.converted == 2
    assert sum(count_macs(converted, check_and_infer(converted)).values()) == report.macs_after
    assert report.macs_after < report.macs_before
    # the written graph computes exactly the numpy rank-1 truncation of each weight
    reference = rank1_reconstruction(model, ["middle", "last"])
    assert max_relative_deviation(reference, converted) < 1e-5
    assert report.parity == pytest.approx(max_relative_deviation(model, reference), rel=1e-3)
    assert report.parity > 1e-2  # rank 1 of a random weight is no exact rewrite


def test_the_reported_error_is_the_energy_the_rank1_cut_drops(rank1):
    model = model_with_three_convs()
    _, report = convert(model, method="rank1", budget=1, check_parity=False)
    weight = {layer.name: layer.weight for layer in analyze(model).convs}["last"]
    singular = np.linalg.svd(weight.reshape(weight.shape[0], -1).astype(np.float64))[1]
    row = next(row for row in report.layers if row.name == "last")
    assert row.error == pytest.approx(float(np.sum(singular[1:] ** 2)), rel=1e-5)
    assert report.parity is None


def test_a_second_pass_writes_files_and_report_rows_like_gdws(rank1, tmp_path):
    source, output = tmp_path / "model.onnx", tmp_path / "rank1.onnx"
    onnx.save(model_with_three_convs(), str(source))
    report, rewritten = convert_file(source, output, method="rank1", budget=1)
    assert rewritten and output.is_file()
    onnx.checker.check_model(str(output), full_check=True)
    table = report.to_dict()
    assert table["converted"] == 2 and len(table["layers"]) == 4
    assert table["reduction"] == pytest.approx(report.macs_before / report.macs_after)


def test_a_pass_without_lowerings_refuses_tuning_and_lowerings(rank1):
    with pytest.raises(GdwsError, match="'rank1' has no lowerings"):
        convert(model_with_three_convs(), method="rank1", budget=1, lowering="gather")


def test_nothing_eligible_names_the_pass(rank1):
    model = conv_chain([ConvSpec(8, group=2, name="a"), ConvSpec(8, group=4, name="b")])
    with pytest.raises(GdwsError, match=r"no Conv rank-1 can rewrite \(2 x not a plain conv\)"):
        convert(model, method="rank1", budget=1, all_layers=True)


def test_an_unknown_method_is_a_one_line_error():
    with pytest.raises(GdwsError, match="unknown method 'nope' \\(choose from gdws"):
        convert(model_with_three_convs(), method="nope", budget=1)


def test_gdws_selection_gives_its_reasons_before_the_first_conv_rule():
    model = conv_chain([ConvSpec(8, group=2, name="a"), ConvSpec(8, name="b")])
    generic = {layer.name: layer.skipped for layer in analyze(model).convs}
    selected = {layer.name: layer.skipped for layer in GdwsPass().select(analyze(model)).convs}
    assert generic == {"a": "first conv (kept dense; --all-layers converts it)", "b": None}
    assert selected == {"a": "grouped conv (group=2)", "b": None}


BUNDLED = Path(__file__).resolve().parents[1] / "models" / "robust_photos.onnx"


@pytest.mark.parametrize("method", ["gkp", "atmc"])
@pytest.mark.parametrize("reduction", [1.5, 2.0, 3.0])
def test_mac_target_is_reached_within_one_percent_on_a_conv_chain(method, reduction):
    converted, report = convert(mixed_chain(), method=method, mac_reduction=reduction)
    assert reduction <= report.reduction <= reduction * 1.01
    assert sum(count_macs(converted, check_and_infer(converted)).values()) == report.macs_after
    rows = {row.name: row for row in report.layers}
    assert rows["grouped"].skipped == "grouped conv (group=4)"
    assert report.method == method and report.allocation == "relative"
    assert report.parity is not None and report.parity > 0


@pytest.mark.parametrize("method", ["gkp", "atmc"])
@pytest.mark.parametrize("reduction", [1.5, 3.0])
def test_mac_target_is_reached_within_one_percent_on_the_bundled_model(method, reduction):
    converted, report = convert(BUNDLED, method=method, mac_reduction=reduction)
    assert reduction <= report.reduction <= reduction * 1.01
    assert sum(count_macs(converted, check_and_infer(converted)).values()) == report.macs_after
