"""ATMC's post-training part (--method atmc): the factors exact at full rank, the sparse
residual and k-means weight sharing as properties, rank shares and MAC targets, and the
output accepted by onnx.checker, onnxruntime, the torch mirror, TensorRT-RTX's parser and
the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.parity import max_relative_deviation, random_inputs
from gdws_deploy.ir.size import weight_bits
from gdws_deploy.passes.atmc.allocation import allocate_ranks
from gdws_deploy.passes.atmc.compression import AtmcPass
from gdws_deploy.passes.atmc.factors import (
    factorize,
    max_rank,
    share_weights,
    sparse_residuals,
    spectrum,
)
from gdws_deploy.passes.base import LayerOption
from gdws_deploy.pipeline.convert import convert, convert_file
from gdws_deploy.robustness.mirror import OnnxMirror
from tests.cli_run import assert_one_line_error, run_cli
from tests.conv_models import ConvSpec, conv_chain, mixed_chain
from tests.tensorrt_rtx import assert_parses, needs_tensorrt_rtx

PHOTOS = Path(__file__).resolve().parents[1] / "models" / "robust_photos.onnx"


def factored(model: onnx.ModelProto, rank=None, sparsity=None, bits=None):
    """Every eligible Conv of `model` factored at `rank` (None: full rank), as
    AtmcPass.write takes them."""
    analyzed = AtmcPass().select(analyze(model))
    layers = analyzed.eligible
    svds = [spectrum(layer.weight) for layer in layers]
    ranks = [svd[1].size if rank is None else rank for svd in svds]
    weights = [layer.weight for layer in layers]
    forms = factorize(weights, svds, ranks, sparsity, bits)
    chosen = {
        layer.index: LayerOption(form, 0, form.error, form.rank, "low-rank")
        for layer, form in zip(layers, forms)
    }
    return analyzed, chosen


def with_weights(model: onnx.ModelProto, analyzed, chosen) -> onnx.ModelProto:
    """`model` with each factored Conv's weight replaced by the dense weight its form
    computes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dense = {
        f"{layer.name}.weight": chosen[layer.index].factors.dense().astype(np.float32)
        for layer in analyzed.eligible
    }
    for tensor in out.graph.initializer:
        if tensor.name in dense:
            tensor.CopyFrom(numpy_helper.from_array(dense[tensor.name], tensor.name))
    return out


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_full_rank_factors_are_exact_in_onnxruntime_and_pass_the_checker():
    model = mixed_chain()
    analyzed, chosen = factored(model)
    assert sorted(o.factors.rank for o in chosen.values()) == [36, 40, 48]  # min(M, C*kh*kw)
    written = AtmcPass().write(analyzed, chosen)
    onnx.checker.check_model(written, full_check=True)
    assert max_relative_deviation(model, written) < 1e-5
    kinds = [node.op_type for node in written.graph.node]
    assert kinds.count("Conv") == 3 * 2 + 2 and "Add" not in kinds


def test_low_rank_form_computes_the_dense_conv_of_its_factors():
    model = mixed_chain()
    analyzed, chosen = factored(model, rank=3)
    written = AtmcPass().write(analyzed, chosen)
    assert max_relative_deviation(with_weights(model, analyzed, chosen), written) < 1e-5
    assert max_relative_deviation(model, written) > 1e-2
    # the kxk factor keeps the strides: "odd" halves the map as the original did
    odd = next(n for n in written.graph.node if n.name == "odd/atmc_v")
    assert [list(a.ints) for a in odd.attribute if a.name == "strides"] == [[2, 2]]


def test_truncated_svd_error_is_the_dropped_singular_energy():
    weight = np.random.default_rng(0).standard_normal((24, 8, 3, 3))
    svd = spectrum(weight)
    (form,) = factorize([weight], [svd], [5])
    assert form.first.shape == (5, 8, 3, 3) and form.second.shape == (24, 5, 1, 1)
    assert form.error == pytest.approx(float((svd[1][5:] ** 2).sum()), rel=1e-9)


@pytest.mark.parametrize("shape", [(24, 8, 3, 3), (100, 4, 3, 3), (48, 40, 1, 1)])
def test_spectrum_from_the_gram_matrix_is_the_svd(shape):
    weight = np.random.default_rng(5).standard_normal(shape)
    weight[: shape[0] // 2] = weight[0]  # rank deficient: half the filters alike
    u, s, vt = spectrum(weight)
    bank = weight.reshape(shape[0], -1)
    np.testing.assert_allclose(s, np.linalg.svd(bank, compute_uv=False), atol=1e-9 * s[0])
    np.testing.assert_allclose((u * s) @ vt, bank, atol=1e-12 * s[0])
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(vt))


def test_max_rank_is_the_largest_rank_with_fewer_macs():
    for shape in [(32, 16, 3, 3), (64, 64, 3, 3), (40, 48, 1, 1), (7, 3, 5, 5)]:
        m, k = shape[0], int(np.prod(shape[1:]))
        r = max_rank(shape)
        assert r * (k + m) < m * k <= (r + 1) * (k + m)
    assert max_rank((1, 16, 3, 3)) == 0 and max_rank((8, 1, 1, 1)) == 0


def test_shared_weights_take_at_most_two_to_the_bits_values_and_more_bits_err_less():
    values = np.random.default_rng(1).standard_normal((64, 3, 3, 3))
    errors = []
    for bits in range(1, 7):
        shared = share_weights(values, bits)
        assert shared.shape == values.shape and np.unique(shared).size <= 2**bits
        errors.append(float(((values - shared) ** 2).sum()))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    few = np.array([0.5, -1.0, 0.5, 2.0])
    np.testing.assert_array_equal(share_weights(few, 2), few)  # 3 levels fit in 2 bits


def test_every_factor_of_every_layer_is_shared_in_the_written_model():
    model = mixed_chain()
    converted, report = convert(model, method="atmc", mac_reduction=2, sparsity=0.1, bits=3)
    factors = [t for t in converted.graph.initializer if "/atmc_" in t.name]
    assert {t.name.split("/")[1] for t in factors} == {"atmc_v", "atmc_u", "atmc_c"}
    for tensor in factors:
        values = numpy_helper.to_array(tensor)
        assert values.dtype == np.float32  # the graph stays float
        assert np.unique(values[values != 0]).size <= 8, tensor.name
    assert report.size_bits_after == weight_bits(converted)
    assert report.size_bits_before == 32 * sum(
        np.count_nonzero(numpy_helper.to_array(t)) for t in model.graph.initializer
    )
    assert report.size_bits_after < report.size_bits_before / 3


def test_sparse_residual_mends_the_factors_and_is_exact_at_sparsity_one():
    model = mixed_chain()
    errors = []
    for sparsity in (None, 0.05, 0.3, 1.0):
        analyzed, chosen = factored(model, rank=2, sparsity=sparsity)
        errors.append(sum(o.factors.error for o in chosen.values()))
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-8 * errors[0]
    written = AtmcPass().write(analyzed, chosen)
    assert max_relative_deviation(model, written) < 1e-5
    kinds = [node.op_type for node in written.graph.node]
    assert kinds.count("Add") == 3 and kinds.count("Conv") == 3 * 3 + 2


def test_sparse_budget_is_shared_across_layers_by_magnitude():
    rng = np.random.default_rng(2)
    small, large = rng.standard_normal((4, 50)), 10 * rng.standard_normal((4, 50))
    kept = sparse_residuals([small, large], 0.25)  # 100 of 400 entries, the largest
    assert sum(np.count_nonzero(k) for k in kept) == 100
    everything = np.sort(np.abs(np.concatenate([small.ravel(), large.ravel()])))[::-1]
    smallest_kept = min(np.abs(k[k != 0]).min() for k in kept if k.any())
    assert smallest_kept == everything[99]
    assert np.count_nonzero(kept[1]) > np.count_nonzero(kept[0])
    np.testing.assert_array_equal(kept[1][kept[1] != 0], large[kept[1] != 0])


def test_the_allocation_drops_low_energy_ranks_first_and_refuses_the_unreachable():
    flat = np.ones(8)  # every rank carries as much energy
    steep = np.r_[10.0, np.full(7, 0.01)]  # one rank carries almost all
    top, dense, price = np.array([4, 4]), np.array([800.0, 800.0]), np.array([150.0, 150.0])
    # 2x of 1600 MACs: save 800. Each layer's first step (to rank 4) saves 200, each rank
    # dropped then 150: the steep layer goes to rank 1 first (650 saved, little energy),
    # then the flat one's first step closes the target.
    ranks = allocate_ranks([flat, steep], top, dense, price, 1600.0, 2.0)
    assert ranks.tolist() == [4, 1]
    with pytest.raises(GdwsError, match=r"cannot reach 20x fewer MACs: at most 5\.33x"):
        allocate_ranks([flat, steep], top, dense, price, 1600.0, 20.0)


def test_rank_share_keeps_the_ceiling_share_of_full_rank_where_it_saves_macs():
    model = mixed_chain()
    _, report = convert(model, method="atmc", rank_share=0.3)
    rows = {row.name: row for row in report.layers}
    full = {"wide": 48, "point": 40, "odd": 36}  # min(M, C*kh*kw)
    for name, rank in full.items():
        assert rows[name].kernels == math.ceil(0.3 * rank)
        assert rows[name].macs_after < rows[name].macs_before
    assert report.target == "rank_share=0.3" and report.allocation is None
    # 0.9 of full rank costs more MACs than dense in every layer (max ranks 41, 21, 32)
    _, dense = convert(model, method="atmc", rank_share=0.9, check_parity=False)
    assert dense.converted == 0
    left = [row.name for row in dense.layers if "no fewer MACs" in (row.skipped or "")]
    assert left == list(full)


def test_output_passes_the_full_checker_and_the_mirror_matches_onnxruntime(tmp_path):
    source, output = tmp_path / "chain.onnx", tmp_path / "chain.atmc.onnx"
    onnx.save(mixed_chain(), str(source))
    report, rewritten = convert_file(
        source, output, method="atmc", mac_reduction=2, sparsity=0.05, bits=4
    )
    assert rewritten and report.converted > 0
    onnx.checker.check_model(str(output), full_check=True)
    model = onnx.load(str(output))
    assert "Add" in [node.op_type for node in model.graph.node]  # the residual branch too
    import onnxruntime

    feeds = random_inputs(model, seed=4)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)[0]
    with torch.no_grad():
        actual = OnnxMirror(model)(*[torch.from_numpy(v) for v in feeds.values()])
    # outputs reach 1e4 through three random layers: float32 sums differ by 1e-7 of that
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-6 * scale)


def test_atmc_refuses_what_only_gdws_takes_and_settings_out_of_range():
    for changes, fragment in [
        ({"beta": 0.1}, "takes a MAC reduction or a rank share, not beta"),
        ({"allocation": "energy", "mac_reduction": 2}, "not 'energy'"),
        ({"lowering": "gather", "mac_reduction": 2}, "'atmc' has no lowerings"),
        ({"rank_share": 0.5, "mac_reduction": 2}, "give exactly one of beta, budget, "),
        ({"rank_share": 0.0}, "rank share must be a number in (0, 1], got 0.0"),
        ({"rank_share": 1.5}, "rank share must be a number in (0, 1]"),
        ({"mac_reduction": 2, "sparsity": -0.1}, "sparsity must be a share in [0, 1]"),
        ({"mac_reduction": 2, "bits": 0}, "bits must be a whole number from 1 to 16, got 0"),
        ({"mac_reduction": 2, "bits": 2.5}, "bits must be a whole number"),
    ]:
        with pytest.raises(GdwsError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
            convert(mixed_chain(), method="atmc", **changes)
    with pytest.raises(GdwsError, match="rank_share, bits: method 'atmc' only, not 'gkp'"):
        convert(mixed_chain(), method="gkp", rank_share=0.5, bits=4)


def test_nothing_atmc_can_factor_is_one_line():
    model = conv_chain([ConvSpec(8, group=8, name="a"), ConvSpec(8, group=2, name="b")], (8, 8, 8))
    with pytest.raises(GdwsError, match="nothing for ATMC to factor"):
        convert(model, method="atmc", mac_reduction=2, all_layers=True)


def test_cli_convert_with_method_atmc_on_the_bundled_model(capsys, tmp_path):
    output, table = tmp_path / "photos.atmc.onnx", tmp_path / "r.json"
    result = run_cli(
        capsys, "convert", PHOTOS, "--method", "atmc", "--mac-reduction", "2", "--bits", "4",
        "--sparsity", "0.02", "-o", output, "--report", table,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "ATMC conversion (mac_reduction=2)" in result.out and "low-rank+sparse" in result.out
    assert "as ATMC counts them (non-zeros x bits)" in result.out
    assert "saves model size, not time" in result.err and "graph stays float" in result.err
    record = json.loads(table.read_text())
    assert record["method"] == "atmc"
    assert record["size_bits_after"] < record["size_bits_before"] / 4
    assert record["reduction"] < 1  # the residual branches run dense: more MACs, not fewer
    onnx.checker.check_model(str(output), full_check=True)


def test_cli_rank_share_replaces_the_default_mac_target(capsys, tmp_path):
    source, output, table = tmp_path / "m.onnx", tmp_path / "m.atmc.onnx", tmp_path / "r.json"
    onnx.save(mixed_chain(), str(source))
    result = run_cli(capsys, "convert", source, "--method", "atmc", "--rank-share", "0.25",
                     "-o", output, "--report", table)  # fmt: skip
    assert result.code == 0, result.err
    record = json.loads(table.read_text())
    assert record["target"] == "rank_share=0.25" and record["converted"] == 3


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--method", "atmc", "--beta", "0.1"), "--method atmc takes --mac-reduction or "
         "--rank-share, not --beta"),
        (("--method", "atmc", "--tune", "ort"), "not --tune"),
        (("--method", "gkp", "--rank-share", "0.5"), "--rank-share is ATMC's: give --method atmc"),
        (("--bits", "4"), "--bits is ATMC's: give --method atmc too"),
        (("--method", "atmc", "--rank-share", "0.5", "--mac-reduction", "2"),
         "give exactly one of beta, budget, mac_reduction, rank_share"),
        (("--method", "atmc", "--rank-share", "2"), "rank share must be a number in (0, 1]"),
        (("--method", "atmc", "--sparsity", "1.5"), "sparsity must be a share in [0, 1]"),
        (("--method", "atmc", "--bits", "0"), "bits must be a whole number from 1 to 16"),
        (("--method", "atmc", "--bits", "2.5"), "--bits must be a number (int), got '2.5'"),
    ],
)  # fmt: skip
def test_cli_bad_atmc_input_is_a_one_line_error_and_writes_nothing(capsys, tmp_path, flags, named):
    source = tmp_path / "m.onnx"
    onnx.save(mixed_chain(), str(source))
    result = run_cli(capsys, "convert", source, *flags)
    assert_one_line_error(result, named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@needs_tensorrt_rtx
def test_tensorrt_rtx_parser_accepts_the_factored_form_with_its_residual(tmp_path):
    source, output = tmp_path / "chain.onnx", tmp_path / "chain.atmc.onnx"
    onnx.save(mixed_chain(), str(source))
    convert_file(source, output, method="atmc", mac_reduction=2, sparsity=0.05, bits=4)
    assert_parses(output)
