"""gdws-deploy compare: every method at every target measured in one run, one table, one
plot; weight storage counted one way for every method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from matplotlib.image import imread
from onnx import TensorProto, helper, numpy_helper

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import load_model
from gdws_deploy.ir.size import weight_bits
from gdws_deploy.pipeline.compare import MethodChoice, parse_methods, run_compare
from gdws_deploy.pipeline.results import BenchSettings
from gdws_deploy.robustness.attacks import make_attacks
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.data import load_dataset
from tests.cli_run import assert_one_line_error, run_cli

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "robust_photos.onnx"
QUICK_BENCH = BenchSettings(batch=8, duration_s=0.05, rounds=1, threads=1)


def _check(spec: str) -> RobustnessCheck:
    attacks = tuple(make_attacks("pgd-linf", {"linf": 4 / 255}, steps=2))
    return RobustnessCheck(load_dataset(spec, limit=24), attacks)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    result = run_compare(
        BUNDLED,
        out,
        _check("photos"),
        methods=parse_methods("gdws,gkp"),
        mac_reductions=[2.0, 3.0],
        calibration=_check("photos:train"),
        bench=QUICK_BENCH,
    )
    return result, out


def test_compare_measures_every_method_at_every_target(compared):
    result, out = compared
    record = json.loads((out / "compare.json").read_text())
    labels = [point["label"] for point in record["points"]]
    assert labels == ["original", "gdws 2x", "gdws 3x", "gkp 2x", "gkp 3x"]
    assert [p["method"] for p in record["points"]] == ["", "gdws", "gdws", "gkp", "gkp"]
    for point in result.points[1:]:
        assert Path(point.model).parent == out and Path(point.model).exists()
        assert point.size_bits == weight_bits(load_model(point.model).model)
        assert point.images_per_s > 0 and point.speedup > 0
        low, high = point.clean_ci95
        assert low <= point.clean_acc <= high
    # GKP's MAC target is reached within a kernel step; GDWS's before tuning sent layers back
    gkp = [p for p in result.points if p.method == "gkp"]
    assert [round(p.reduction) for p in gkp] == [2, 3]
    assert all(p.size_bits < result.original.size_bits for p in result.points[1:])
    assert imread(out / "compare.png").shape[0] > 100


def test_compare_cli_prints_one_row_per_model_int8_alone_without_a_target(capsys, tmp_path):
    args = ["--dataset", "photos", "--limit", "8", "--steps", "1", "--eps", "4/255"]
    timing = ["--duration", "0.05", "--rounds", "1", "--threads", "1", "--bench-batch", "8"]
    result = run_cli(
        capsys,
        "compare",
        BUNDLED,
        "--methods",
        "gkp",
        "--mac-reductions",
        "2",
        *args,
        *timing,
        "--out",
        tmp_path / "cli",
    )
    assert result.code == 0, result.err
    assert "gkp 2x" in result.out and "original" in result.out
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
        "compare.json",
        "compare.png",
        "robust_photos.r2.gkp.onnx",
    ]


@pytest.mark.parametrize(
    "methods, fragment",
    [
        ("gdws,nope", "unknown method 'nope'"),
        ("gdws+fp16", "'gdws+fp16' is not METHOD or METHOD+int8"),
        ("gkp,gkp", "repeats a method"),
        ("", "is not METHOD"),
    ],
)
def test_bad_method_lists_are_one_line_errors(capsys, tmp_path, methods, fragment):
    result = run_cli(
        capsys,
        "compare",
        BUNDLED,
        "--methods",
        methods,
        "--dataset",
        "photos",
        "--out",
        tmp_path / "x",
    )
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x").exists()


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = run_cli(
        capsys, "compare", BUNDLED, "--methods", "gkp", "--dataset", "photos", "--out", target
    )
    assert_one_line_error(result, "exists and is not a folder")
    assert target.read_text() == "keep me"


def test_int8_follows_a_pass_or_stands_alone():
    assert parse_methods("gdws+int8")[0] == MethodChoice("gdws", int8=True)
    assert parse_methods("gdws+int8")[0].label == "gdws+int8"
    assert not MethodChoice("int8", int8=True).takes_target
    with pytest.raises(GdwsError):
        parse_methods("gdws+int8+int8")


def _model_with(weight: np.ndarray) -> onnx.ModelProto:
    """A model holding `weight` (of its own dtype) and an int64 shape tensor."""
    tensor = numpy_helper.from_array(weight, "w")
    shape = helper.make_tensor(
        "shape", TensorProto.INT64, [2], np.array([-1, weight.size], dtype=np.int64)
    )
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.size])],
        [tensor, shape],
    )
    return helper.make_model(graph)


def test_dense_float_weights_count_32_bits_each_and_shapes_nothing():
    weight = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    assert weight_bits(_model_with(weight)) == 512 * 32


def test_zeros_are_free_and_shared_values_cost_their_index_width_plus_codebook():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(512).astype(np.float32)
    weight[:256] = 0.0
    assert weight_bits(_model_with(weight)) == 256 * 32
    codebook = rng.standard_normal(16).astype(np.float32)
    shared = codebook[rng.integers(0, 16, 512)]
    assert weight_bits(_model_with(shared)) == 512 * 4 + 16 * 32


def test_int8_weights_count_8_bits():
    weight = np.random.default_rng(0).integers(-127, 128, 512).astype(np.int8)
    weight[weight == 0] = 1
    assert weight_bits(_model_with(weight)) == 512 * 8
