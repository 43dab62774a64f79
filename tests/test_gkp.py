"""Grouped kernel pruning (--method gkp): the math as properties, the grouped rewrite exact
for the kept kernels, MAC targets, and the output accepted by onnx.checker, onnxruntime,
the torch mirror, TensorRT-RTX's parser and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.parity import max_relative_deviation, random_inputs
from gdws_deploy.passes.base import LayerOption
from gdws_deploy.passes.gkp.compression import GkpPass, allocate_keep
from gdws_deploy.passes.gkp.kernels import (
    filter_groups,
    kept_count,
    prune_layer,
    roughness,
    snake_groups,
)
from gdws_deploy.pipeline.convert import convert, convert_file
from gdws_deploy.robustness.mirror import OnnxMirror
from tests.cli_run import assert_one_line_error, run_cli
from tests.conv_models import ConvSpec, conv_chain, mixed_chain
from tests.tensorrt_rtx import assert_parses, needs_tensorrt_rtx

PHOTOS = Path(__file__).resolve().parents[1] / "models" / "robust_photos.onnx"


def rough_by_loops(kernel: np.ndarray) -> float:
    """The authors' definition, cell by cell: |a^2 - b^2| over each cell's 8 neighbours."""
    kh, kw = kernel.shape
    total = 0.0
    for y in range(kh):
        for x in range(kw):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (dy or dx) and 0 <= y + dy < kh and 0 <= x + dx < kw:
                        total += abs(kernel[y, x] ** 2 - kernel[y + dy, x + dx] ** 2)
    return total


def pruned_options(model: onnx.ModelProto, prune: float) -> dict:
    """Every eligible Conv of `model` pruned to share `prune`, as GkpPass.write takes them."""
    analyzed = GkpPass().select(analyze(model))
    chosen = {}
    for layer in analyzed.eligible:
        keep = kept_count(layer.weight_shape[1], prune)
        factors = prune_layer(layer.weight, keep)
        chosen[layer.index] = LayerOption(factors, 0, factors.error, keep, "grouped")
    return analyzed, chosen


def masked_model(model: onnx.ModelProto, chosen: dict, analyzed) -> onnx.ModelProto:
    """`model` with each pruned Conv's pruned kernels zeroed in its dense weight."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    masks = {
        f"{layer.name}.weight": chosen[layer.index].factors.masked(layer.weight)
        for layer in analyzed.eligible
    }
    for tensor in out.graph.initializer:
        if tensor.name in masks:
            tensor.CopyFrom(numpy_helper.from_array(masks[tensor.name], tensor.name))
    return out


def test_roughness_is_the_authors_neighbour_sum():
    kernels = np.random.default_rng(0).standard_normal((3, 2, 5, 3))
    expected = np.vectorize(rough_by_loops, signature="(h,w)->()")(kernels)
    np.testing.assert_allclose(roughness(kernels), expected, rtol=1e-12)
    assert roughness(np.ones((4, 1, 1))).tolist() == [0.0] * 4


def test_snake_groups_deal_ranks_back_and_forth_and_partition_the_filters():
    scores = np.random.default_rng(1).permutation(24).astype(float)
    groups = snake_groups(scores, 4)
    assert groups.shape == (4, 6)
    assert sorted(groups.reshape(-1).tolist()) == list(range(24))
    for g, members in enumerate(groups):
        ranks = sorted(scores[members].astype(int).tolist())
        # rows of ranks 0-3, 4-7, ...: left to right, then right to left
        assert ranks == [row * 4 + (g if row % 2 == 0 else 3 - g) for row in range(6)]
        assert members.tolist() == sorted(members.tolist())  # original order inside


def test_one_by_one_filters_are_grouped_by_magnitude():
    weight = np.zeros((8, 3, 1, 1))
    weight[:, 0, 0, 0] = [5, -8, 1, 7, -2, 3, 6, -4]  # L1 ranks (largest first): 1,3,6,0,7,5,4,2
    groups = filter_groups(weight, 4)
    assert groups.tolist() == [[1, 2], [3, 4], [5, 6], [0, 7]]


@pytest.mark.parametrize("prune", [0.0, 0.25, 0.4375, 0.7, 0.99])
def test_each_group_keeps_round_share_of_its_kernels(prune):
    weight = np.random.default_rng(2).standard_normal((40, 20, 3, 3)).astype(np.float32)
    factors = prune_layer(weight, kept_count(20, prune))
    keep = max(1, round((1 - prune) * 20))
    assert factors.groups == 8 and factors.kept.shape == (8, keep)
    assert sorted(factors.order.tolist()) == list(range(40))
    for kept in factors.kept:
        assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < 20
    filters = factors.order.reshape(8, 5)
    expected = weight[filters[:, :, None], factors.kept[:, None, :]].reshape(40, keep, 3, 3)
    np.testing.assert_array_equal(factors.weight, expected)
    masked = factors.masked(weight)
    assert factors.error == pytest.approx(float(((weight - masked).astype(float) ** 2).sum()))
    assert np.count_nonzero(np.abs(masked).sum(axis=(2, 3))) == 40 * keep


def test_a_filter_count_eight_does_not_divide_gets_the_most_even_groups():
    weight = np.random.default_rng(3).standard_normal((12, 6, 3, 3))
    assert prune_layer(weight, 3).kept.shape == (4, 3)


def test_p_zero_rewrite_is_exact():
    model = mixed_chain()
    analyzed, chosen = pruned_options(model, 0.0)
    assert {o.factors.keep for o in chosen.values()} == {32, 48, 40}
    assert max_relative_deviation(model, GkpPass().write(analyzed, chosen)) < 1e-5


def test_pruned_rewrite_computes_the_dense_conv_with_pruned_kernels_zeroed():
    model = mixed_chain()
    analyzed, chosen = pruned_options(model, 0.5)
    written = GkpPass().write(analyzed, chosen)
    kinds = [node.op_type for node in written.graph.node]
    assert kinds.count("Gather") == 6  # in and out of each of the 3 pruned Convs
    groups = [a.i for n in written.graph.node if n.op_type == "Conv" for a in n.attribute]
    assert max_relative_deviation(masked_model(model, chosen, analyzed), written) < 1e-5
    assert max_relative_deviation(model, written) > 1e-2
    assert 8 in groups and 4 in groups  # "odd" (36 filters) has gcd(36, 8) = 4 groups


def test_the_bundled_model_at_2x_overshoots_by_no_more_than_its_smallest_step():
    # every layer moves in steps of 36864 or 73728 MACs: 2.020x is the least reduction >= 2x
    _, report = convert(PHOTOS, method="gkp", mac_reduction=2, check_parity=False)
    best = report.macs_before / (report.macs_before - 99 * 36864)
    assert report.reduction == pytest.approx(best)


def test_the_allocation_prunes_low_energy_layers_first_and_reaches_the_target():
    low = np.linspace(0, 0.01, 16)  # a layer whose pruned kernels carry little energy
    high = np.linspace(0, 0.9, 16)
    keep = allocate_keep([low, high], np.array([1600.0, 1600.0]), 3200.0, 1.25)
    assert keep.tolist() == [9, 16]  # 640 MACs to save: 7 steps of 100 in the cheap layer
    with pytest.raises(GdwsError, match=r"cannot reach 20x fewer MACs: at most 16\.00x"):
        allocate_keep([low, high], np.array([1600.0, 1600.0]), 3200.0, 20)


def test_output_passes_the_full_checker_and_the_mirror_matches_onnxruntime(tmp_path):
    source, output = tmp_path / "chain.onnx", tmp_path / "chain.gkp.onnx"
    onnx.save(mixed_chain(), str(source))
    report, rewritten = convert_file(source, output, method="gkp", mac_reduction=4)
    assert rewritten and report.converted == 3
    onnx.checker.check_model(str(output), full_check=True)
    model = onnx.load(str(output))
    import onnxruntime

    feeds = random_inputs(model, seed=4)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    with torch.no_grad():
        actual = OnnxMirror(model)(*[torch.from_numpy(v) for v in feeds.values()])
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_gkp_refuses_what_only_gdws_takes():
    for changes, fragment in [
        ({"beta": 0.1}, "takes a MAC reduction only, not beta"),
        ({"budget": 2}, "takes a MAC reduction only, not budget"),
        ({"allocation": "energy", "mac_reduction": 2}, "not 'energy'"),
        ({"lowering": "gather", "mac_reduction": 2}, "'gkp' has no lowerings"),
    ]:
        with pytest.raises(GdwsError, match=fragment):
            convert(mixed_chain(), method="gkp", **changes)


def test_nothing_gkp_can_prune_is_one_line():
    model = conv_chain([ConvSpec(8, group=8, name="a"), ConvSpec(8, group=2, name="b")], (8, 8, 8))
    with pytest.raises(GdwsError, match="nothing for GKP to prune"):
        convert(model, method="gkp", mac_reduction=2, all_layers=True)


def test_cli_convert_with_method_gkp_writes_the_pruned_model(capsys, tmp_path):
    source, output, table = tmp_path / "m.onnx", tmp_path / "m.gkp.onnx", tmp_path / "r.json"
    onnx.save(mixed_chain(), str(source))
    result = run_cli(
        capsys, "convert", source, "--method", "gkp", "--mac-reduction", "2",
        "-o", output, "--report", table,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "GKP conversion (mac_reduction=2)" in result.out and "grouped" in result.out
    record = json.loads(table.read_text())
    assert record["method"] == "gkp" and 2 <= record["reduction"] <= 2.02
    onnx.checker.check_model(str(output), full_check=True)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--beta", "0.1"), "--beta"),
        (("--budget", "2"), "--budget"),
        (("--tune", "ort"), "--tune"),
        (("--speedup", "2", "--tune", "ort"), "--speedup"),
        (("--alphas", "a.npz"), "--alphas"),
        (("--dataset", "digits"), "--dataset"),
    ],
)
def test_cli_gkp_with_a_gdws_flag_is_a_one_line_error(capsys, tmp_path, flags, named):
    source = tmp_path / "m.onnx"
    onnx.save(mixed_chain(), str(source))
    result = run_cli(capsys, "convert", source, "--method", "gkp", *flags)
    assert_one_line_error(result, f"--method gkp takes --mac-reduction only, not {named}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@needs_tensorrt_rtx
def test_tensorrt_rtx_parser_accepts_the_grouped_form(tmp_path):
    source, output = tmp_path / "chain.onnx", tmp_path / "chain.gkp.onnx"
    onnx.save(mixed_chain(), str(source))
    convert_file(source, output, method="gkp", mac_reduction=2, check_parity=False)
    assert_parses(output)


def test_cli_sweep_with_method_gkp_measures_without_calibrating(capsys, tmp_path):
    from tests.digits_fixtures import export_trained_digits_cnn, torch_threads

    model, out = export_trained_digits_cnn(tmp_path / "digits.onnx"), tmp_path / "sweep"
    refused = run_cli(capsys, "sweep", model, "--dataset", "digits", "--method", "gkp",
                      "--betas", "1", "--out", out)  # fmt: skip
    assert_one_line_error(refused, "--method gkp takes --mac-reduction only, not --betas")
    with torch_threads(1):
        result = run_cli(
            capsys, "sweep", model, "--dataset", "digits", "--limit", 40, "--eps", "0.05",
            "--steps", 1, "--method", "gkp", "--mac-reductions", "2", "--bench-batch", 4,
            "--duration", 0.05, "--rounds", 1, "--threads", 1, "--out", out,
        )  # fmt: skip
    assert result.code == 0, result.err
    assert "calibrating" not in result.err and "converting at 2x" in result.err
    record = json.loads((out / "sweep.json").read_text())
    assert [point["label"] for point in record["points"]] == ["original", "2x"]
    assert record["points"][1]["reduction"] >= 2 and record["allocation"] == "relative"
