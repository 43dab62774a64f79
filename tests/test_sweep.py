"""gdws-deploy sweep: every target converted and measured, JSON, plot and models on disk."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conv_models import ConvSpec, conv_chain
from digits_fixtures import (
    DIGITS_SHAPE,
    export_trained_digits_cnn,
    torch_threads,
    trained_digits_cnn,
)
from matplotlib.image import imread
from search_fixtures import quick_check

from gdws_deploy.commands.sweep import sweep_command
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import check_and_infer, count_macs
from gdws_deploy.pipeline.measure import count_parameters
from gdws_deploy.pipeline.plot import sweep_figure
from gdws_deploy.pipeline.results import BenchSettings
from gdws_deploy.pipeline.sweep import run_sweep
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.data import load_dataset
from tests.cli_run import assert_one_line_error, run_cli

QUICK_BENCH = BenchSettings(batch=8, duration_s=0.05, rounds=1, threads=1)


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    return export_trained_digits_cnn(tmp_path_factory.mktemp("model") / "digits.onnx")


@pytest.fixture(scope="module")
def sweep(digits_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    with torch_threads(1):
        result = run_sweep(
            digits_model,
            out,
            quick_check(),
            calibration=RobustnessCheck(
                load_dataset("digits:train", limit=60), quick_check().attacks
            ),
            mac_reductions=[1.5, 2.0],
            max_robust_drop=0.05,
            bench=QUICK_BENCH,
        )
    return result, out


def test_sweep_json_has_every_point_measured(sweep):
    result, out = sweep
    record = json.loads((out / "sweep.json").read_text())
    assert record == json.loads(json.dumps(result.to_dict()))
    points = record["points"]
    assert [p["kind"] for p in points] == ["original", "target", "target", "max-drop"]
    assert [p["label"] for p in points[:3]] == ["original", "1.5x", "2x"]
    assert points[0]["reduction"] == 1.0 and points[0]["speedup"] == 1.0
    for point, target in zip(points[1:3], (1.5, 2.0)):
        assert point["reduction"] >= target
    for point in points:
        model = onnx.load(point["model"])
        assert sum(count_macs(model, check_and_infer(model)).values()) == point["macs"]
        assert point["parameters"] == count_parameters(model)
        assert point["images_per_s"] > 0 and 0 <= point["robust_acc"] <= point["clean_acc"]
    best = record["operating_point"]["best"]
    assert best["drop"] <= 0.05 + 1e-9 and points[3]["reduction"] == best["reduction"]
    assert record["allocation"] == "measured" and record["calibration"]["dataset"] == "digits:train"


def test_sweep_png_is_a_real_image(sweep):
    _, out = sweep
    image = imread(out / "sweep.png")
    height, width = image.shape[:2]
    assert 300 <= height <= 2000 and 600 <= width <= 3000
    assert image[..., :3].std() > 0.05  # drawn on, not blank


def test_sweep_of_betas_searches_the_drop_with_a_mac_calibration_of_its_own(digits_model, tmp_path):
    """Betas take alphas (LEGO); the search's measured allocation must not get them."""
    with torch_threads(1):
        result = run_sweep(
            digits_model,
            tmp_path / "sweep",
            quick_check(),
            betas=[0.5],
            max_robust_drop=0.05,
            bench=QUICK_BENCH,
        )
    assert result.allocation == "lego per layer"
    assert [p.kind for p in result.points] == ["original", "target", "max-drop"]
    best = result.operating_point.best
    assert best.drop <= 0.05 + 1e-9 and result.points[2].reduction == best.reduction


def test_sweep_figure_has_labelled_axes_and_a_legend(sweep):
    result, _ = sweep
    figure = sweep_figure(result)
    speed, macs = figure.axes
    assert "images/s" in speed.get_xlabel() and "MACs" in macs.get_xlabel()
    assert "robust accuracy" in speed.get_ylabel()
    for axes in (speed, macs):
        entries = [text.get_text() for text in axes.get_legend().get_texts()]
        assert entries == ["original", "GDWS (measured)", "max robust drop"]
        labels = {text.get_text() for text in axes.texts}
        assert {"original", "1.5x", "2x"} <= labels and len(labels) == len(result.points)


def test_sweep_cli_prints_the_table_and_where_things_are(digits_model, tmp_path, capsys):
    out = tmp_path / "new" / "cli"  # folders that do not exist yet are made
    with torch_threads(1):
        result = run_cli(
            capsys, "sweep", digits_model, "--dataset", "digits", "--limit", 40,
            "--eps", "0.05", "--steps", 1, "--betas", "1,4", "--bench-batch", 4,
            "--duration", 0.05, "--rounds", 1, "--threads", 1, "--out", out,
        )  # fmt: skip
    assert result.code == 0, result.err
    assert "beta=1" in result.out and "beta=4" in result.out
    assert f"plot: {out / 'sweep.png'}" in result.out
    assert sorted(p.name for p in out.iterdir()) == [
        "digits.beta1.gdws.onnx", "digits.beta4.gdws.onnx", "sweep.json", "sweep.png",
    ]  # fmt: skip
    assert json.loads((out / "sweep.json").read_text())["allocation"] == "lego per layer"
    assert [p.name for p in out.parent.iterdir()] == ["cli"]  # no staging folder left


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dataset", "digits", "--max-robust-drop", "-0.5"], "must be a fraction in [0, 1)"),
        (["--dataset", "digits", "--allocation", "best"], "'best' is not one of"),
        ([], "Missing option '--dataset'"),
        (["--dataset", "digits", "--mac-reductions", "0.5,2"], "MAC reductions must be >= 1"),
        (["--dataset", "digits", "--mac-reductions", "2", "--betas", "1"], "not both"),
        (["--dataset", "digits", "--mac-reductions", "2,x"], "comma-separated numbers"),
    ],
)
def test_sweep_cli_bad_input_is_one_line(digits_model, tmp_path, capsys, args, fragment):
    out = tmp_path / "never"
    result = run_cli(capsys, "sweep", digits_model, "--out", out, *args)
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_sweep_refuses_an_out_that_is_a_file(digits_model, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("keep me")
    result = run_cli(capsys, "sweep", digits_model, "--dataset", "digits", "--out", out)
    assert_one_line_error(result, "is not a folder")
    assert out.read_text() == "keep me"


def test_parameters_count_float_initializers_only():
    weight = onnx.numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    index = onnx.numpy_helper.from_array(np.zeros(5, np.int64), "i")
    graph = onnx.helper.make_graph([], "g", [], [], initializer=[weight, index])
    assert count_parameters(onnx.helper.make_model(graph)) == 12


def test_sweep_failing_midway_leaves_no_folder_behind(digits_model, tmp_path):
    """Stopped once every model is converted and attacked: nothing of it may remain."""

    def stop_at_timing(message: str) -> None:
        if message.startswith("timing"):
            raise GdwsError("stopped before timing")

    with torch_threads(1), pytest.raises(GdwsError, match="stopped before timing"):
        run_sweep(
            digits_model,
            tmp_path / "sweep",
            quick_check(),
            mac_reductions=[2.0],
            bench=QUICK_BENCH,
            progress=stop_at_timing,
        )
    assert list(tmp_path.iterdir()) == []


def test_sweep_failing_into_an_existing_folder_leaves_it_as_it_was(digits_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with torch_threads(1), pytest.raises(GdwsError, match="stopped"):
        run_sweep(
            digits_model,
            out,
            quick_check(),
            mac_reductions=[2.0],
            bench=QUICK_BENCH,
            progress=lambda message: message.startswith("timing") and _stop(),
        )
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _stop() -> None:
    raise GdwsError("stopped")


@pytest.fixture(scope="module")
def mirrorless_model(tmp_path_factory):
    """Two convertible convs and a Hardmax head: onnxruntime runs it, the mirror cannot."""
    model = conv_chain(
        [ConvSpec(8, weights="random"), ConvSpec(8, weights="random")],
        input_shape=(1, 8, 8),
        dense_head=True,
    )
    model.graph.node[-1].output[0] = "raw_scores"
    model.graph.node.append(onnx.helper.make_node("Hardmax", ["raw_scores"], ["scores"]))
    path = tmp_path_factory.mktemp("mirrorless") / "hardmax.onnx"
    onnx.save(model, path)
    return path


def test_sweep_cli_of_a_model_the_mirror_cannot_run_is_one_line_and_leaves_nothing(
    mirrorless_model, tmp_path, capsys
):
    result = run_cli(
        capsys, "sweep", mirrorless_model, "--dataset", "digits", "--limit", 8, "--steps", 1,
        "--mac-reductions", 2, "--out", tmp_path / "sweep",
    )  # fmt: skip
    assert_ends_in_one_line_error(result, "unsupported op Hardmax")
    assert list(tmp_path.iterdir()) == []


def assert_ends_in_one_line_error(result, fragment: str) -> None:
    """Exit 2 and one error line, the last one; the progress lines before it are not errors."""
    lines = result.err.strip().splitlines()
    assert result.code == 2, result
    assert [line for line in lines if "error" in line] == lines[-1:], result.err
    assert lines[-1].startswith("gdws-deploy: error: ") and fragment in lines[-1], lines[-1]
    assert "Traceback" not in result.err


@pytest.fixture(scope="module")
def fixed_batch_model(tmp_path_factory):
    """The digits CNN as torch exports it by default: batch fixed to 1."""
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    with torch.no_grad():
        torch.onnx.export(
            trained_digits_cnn(), (torch.zeros(DIGITS_SHAPE),), str(path), dynamo=False
        )
    assert onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    return path


def test_sweep_cli_of_a_fixed_batch_model_times_at_its_batch(fixed_batch_model, tmp_path, capsys):
    out = tmp_path / "sweep"
    with torch_threads(1):
        result = run_cli(
            capsys, "sweep", fixed_batch_model, "--dataset", "digits", "--limit", 20,
            "--eps", "0.05", "--steps", 1, "--mac-reductions", 2, "--duration", 0.05,
            "--rounds", 1, "--threads", 1, "--out", out,
        )  # fmt: skip
    assert result.code == 0, result.err
    record = json.loads((out / "sweep.json").read_text())
    assert record["bench"]["batch"] == 1
    assert [p["label"] for p in record["points"]] == ["original", "2x"]
    assert all(p["images_per_s"] > 0 for p in record["points"])


def test_sweep_cli_refuses_another_bench_batch_for_a_fixed_batch_model_before_any_work(
    fixed_batch_model, tmp_path, capsys
):
    result = run_cli(
        capsys, "sweep", fixed_batch_model, "--dataset", "digits", "--bench-batch", 32,
        "--out", tmp_path / "sweep",
    )  # fmt: skip
    assert_one_line_error(result, "--bench-batch 32: the model has a fixed batch of 1")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, tune",
    [([], None), (["--tune"], "ort"), (["--tune", "ort"], "ort"), (["--tune", "trt"], "trt")],
)
def test_sweep_tune_takes_convert_choices_and_bare_means_ort(args, tune):
    argv = ["m.onnx", "--dataset", "digits", *args, "--out", "o"]
    assert sweep_command.make_context("sweep", argv).params["tune"] == tune


def test_sweep_tune_refuses_an_unknown_backend(digits_model, tmp_path, capsys):
    result = run_cli(
        capsys, "sweep", digits_model, "--dataset", "digits", "--tune", "cuda",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(result, "'cuda' is not one of 'ort', 'trt'")


def test_sweep_of_a_model_with_no_convertible_conv_fails_before_any_work(tmp_path, capsys):
    """One conv only, and the first conv is kept: nothing to rewrite, nothing written."""
    path = tmp_path / "one_conv.onnx"
    onnx.save(conv_chain([ConvSpec(10, weights="random")], input_shape=(1, 8, 8)), path)
    out = tmp_path / "sweep"
    result = run_cli(capsys, "sweep", path, "--dataset", "digits", "--out", out)
    assert_one_line_error(result, "the model has no Conv that GDWS can rewrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_conv.onnx"]


def test_sweep_of_a_model_of_pointwise_convs_only_fails_before_any_work(tmp_path):
    """Constant weights, not the first conv, yet nothing GDWS can factor: 1x1 kernels."""
    specs = [ConvSpec(8, kernel=(1, 1), weights="random") for _ in range(3)]
    path = tmp_path / "pointwise.onnx"
    onnx.save(conv_chain(specs, input_shape=(1, 8, 8)), path)
    said = []
    with pytest.raises(GdwsError, match="the model has no Conv that GDWS can rewrite"):
        run_sweep(path, tmp_path / "sweep", quick_check(), progress=said.append)
    assert said == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pointwise.onnx"]
