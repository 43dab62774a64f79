"""Multi-exit deployment: split into stages, calibrate thresholds, the staged runtime, bench.

The models are small torch networks with random weights exported to ONNX with outputs
exit_0, ..., final: one, two or three early exits, and one whose final head also reads a
tensor of the first stage (handed past the middle stage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gdws_deploy.errors import GdwsError
from gdws_deploy.exits.calibrate import calibrate_thresholds
from gdws_deploy.exits.split import open_staged, split_model
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.runtime.staged import (
    CLOSED,
    METADATA_KEY,
    ExitPolicy,
    StagedModel,
    entropy,
    exit_names,
    exit_taken,
)
from tests.cli_run import assert_one_line_error, run_cli
from tests.conv_models import ConvSpec, conv_chain
from tests.tensorrt_rtx import assert_parses, needs_tensorrt_rtx


class MultiExit(nn.Module):
    """Conv stages with a small conv + pool + linear exit after each but the last; `skip`:
    the final head also reads the first stage's features."""

    def __init__(self, exits: int, skip: bool) -> None:
        super().__init__()
        torch.manual_seed(exits + 10 * skip)
        widths = [1] + [4 * (k + 1) for k in range(exits + 1)]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            for a, b in zip(widths, widths[1:])
        )
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, 4, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 10),
            )
            for c in widths[1:-1]
        )
        self.final = nn.Linear(widths[-1], 10)
        self.skip = nn.Linear(widths[1], 10) if skip else None

    def forward(self, x: torch.Tensor):
        outs, first = [], None
        for k, block in enumerate(self.blocks):
            x = block(x)
            first = x if k == 0 else first
            if k < len(self.heads):
                outs.append(self.heads[k](x))
        final = self.final(x.mean(dim=(2, 3)))
        if self.skip is not None:
            final = final + self.skip(first.mean(dim=(2, 3)))
        return (*outs, final)


def export_multi_exit(path: Path, exits: int = 2, skip: bool = False) -> Path:
    names = exit_names(exits + 1)
    torch.onnx.export(
        MultiExit(exits, skip).eval(),
        torch.rand(2, 1, 32, 32),
        str(path),
        input_names=["images"],
        output_names=names,
        dynamic_axes={name: {0: "batch"} for name in ["images", *names]},
        opset_version=17,
        dynamo=False,
    )
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("exits")
    shapes = {"one": (1, False), "two": (2, False), "three": (3, False), "skip": (2, True)}
    return {
        name: export_multi_exit(folder / f"{name}.onnx", *shape) for name, shape in shapes.items()
    }


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).random((48, 1, 32, 32), dtype=np.float32)


def whole_model(path: Path, x: np.ndarray) -> list:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x}
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["one", "two", "three", "skip"])
def test_stages_in_turn_equal_the_whole_model_on_every_exit(models, images, name):
    expected = whole_model(models[name], images)
    with open_staged(models[name], thresholds=[CLOSED] * (len(expected) - 1)) as staged:
        actual = staged.exit_logits(images)
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_tensor_read_two_stages_later_is_handed_on_by_its_stage(models):
    split = split_model(models["skip"])
    first, middle, last = split.stages
    (features,) = first.outputs[1:]  # the first stage's features: read by both
    assert features in middle.inputs and features in last.inputs
    assert features not in middle.outputs  # the runtime keeps it, no stage passes it through
    assert set(last.inputs) == {features, *middle.outputs[1:]}


def test_split_folder_holds_checker_valid_stages_with_explicit_boundaries(models, tmp_path, capsys):
    out = tmp_path / "stages"
    result = run_cli(capsys, "exits", "split", models["two"], "-o", out)
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    produced = {"images"}
    for stage in manifest["stages"]:
        model = onnx.load(str(out / stage["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == stage["inputs"]
        assert [o.name for o in model.graph.output] == stage["outputs"]
        assert set(stage["inputs"]) <= produced  # reads only what came before
        produced |= set(stage["outputs"])
        for info in [*model.graph.input, *model.graph.output]:
            assert info.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [s["exit"] for s in manifest["stages"]] == ["exit_0", "exit_1", "final"]
    macs = [s["macs"] for s in manifest["stages"]]
    assert manifest["policy"]["stage_macs"] == list(np.cumsum(macs))
    full = onnx.load(str(out / "full.onnx"))
    assert [o.name for o in full.graph.output] == ["final"]
    assert macs[0] < manifest["full"]["macs"] < sum(macs)  # heads cost extra


def test_staged_predictions_are_the_whole_model_gated_by_exit_taken(models, images):
    expected = whole_model(models["three"], images)
    thresholds = [float(np.quantile(entropy(z), 0.3)) for z in expected[:-1]]
    with open_staged(models["three"], thresholds=thresholds) as staged:
        logits, exits = staged.predict(images)
        rows = staged.rows
    taken = exit_taken(expected, thresholds)
    np.testing.assert_array_equal(exits, taken)
    chosen = np.stack(expected)[taken, np.arange(len(images))]
    np.testing.assert_allclose(logits, chosen, rtol=1e-6, atol=1e-6)
    # samples that exit drop out: each stage ran on those that had not left yet
    left_before = [int(np.sum(taken < k)) for k in range(len(expected))]
    assert rows == [len(images) - n for n in left_before]
    assert rows[0] > rows[1] > rows[2] > rows[3] > 0


def test_a_batch_that_leaves_at_the_first_exit_runs_no_later_stage(models, images):
    with open_staged(models["two"], thresholds=[100.0, 100.0]) as staged:
        _, exits = staged.predict(images)
        assert staged.rows == [len(images)]
    assert not exits.any()


def test_exit_taken_is_the_first_exit_under_its_threshold():
    sure, unsure = np.array([[10.0, 0, 0]]), np.zeros((1, 3))
    logits = [np.vstack([unsure, sure, unsure]), np.vstack([sure, sure, unsure]), np.zeros((3, 3))]
    assert exit_taken(logits, [0.1, 0.1]).tolist() == [1, 0, 2]
    assert exit_taken(logits, [CLOSED, CLOSED]).tolist() == [2, 2, 2]
    with pytest.raises(GdwsError, match="need 2 thresholds"):
        exit_taken(logits, [0.1])


def test_search_meets_the_budget_and_is_never_less_accurate_than_the_quantile_scheme():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 400)
    # exits that grow more accurate and more confident with depth
    logits = [
        rng.standard_normal((400, 10)) + scale * np.eye(10)[labels] * rng.random((400, 1))
        for scale in (2.0, 4.0, 8.0)
    ]
    policy = ExitPolicy(exit_names(3), (30, 70, 110), 100)
    for budget in (0.5, 0.7, 0.9):
        searched = calibrate_thresholds(logits, labels, policy, budget, "search")
        paper = calibrate_thresholds(logits, labels, policy, budget, "quantile")
        for chosen in (searched, paper):
            exits = exit_taken(logits, chosen.thresholds)
            assert policy.share(exits) <= budget
            assert policy.share(exits) == pytest.approx(chosen.expected_share)
            correct = np.stack(logits)[exits, np.arange(400)].argmax(axis=1) == labels
            assert correct.mean() == pytest.approx(chosen.accuracy)
        assert searched.accuracy >= paper.accuracy
        assert searched.policies > paper.policies


def test_calibrate_stores_thresholds_in_the_metadata_of_a_new_file(models, tmp_path, capsys):
    source = tmp_path / "two.onnx"
    source.write_bytes(models["two"].read_bytes())
    before = digest(source)
    result = run_cli(
        capsys, "exits", "calibrate", source, "--dataset", "photos:train", "--limit", "300",
        "--budget", "0.7",
    )  # fmt: skip
    assert result.code == 0, result.err
    output = tmp_path / "two.exits.onnx"
    assert digest(source) == before
    model = onnx.load(str(output))
    stored = {p.key: p.value for p in model.metadata_props}[METADATA_KEY]
    policy = ExitPolicy.from_json(stored, "test")
    assert policy.budget == 0.7 and policy.calibration == "photos:train"
    data = load_dataset("photos:train", 300)
    exits = exit_taken(whole_model(output, data.x), policy.thresholds)
    assert policy.share(exits) <= 0.7
    assert policy.share(exits) == pytest.approx(policy.expected_share)
    # the staged runtime reads them
    with open_staged(output) as staged:
        assert staged.thresholds == policy.thresholds
        np.testing.assert_array_equal(staged.predict(data.x)[1], exits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.exits.onnx", "two.onnx"]


def test_bench_times_the_staged_and_the_single_pass_model_on_the_data(models, tmp_path, capsys):
    calibrated = tmp_path / "two.exits.onnx"
    common = ("--dataset", "photos", "--limit", "128", "--batch-size", "32")
    assert run_cli(capsys, "exits", "calibrate", models["two"], "-o", calibrated, *common,
                   "--budget", "0.8").code == 0  # fmt: skip
    stages = tmp_path / "stages"
    assert run_cli(capsys, "exits", "split", calibrated, "-o", stages).code == 0
    report = tmp_path / "bench.json"
    result = run_cli(capsys, "exits", "bench", stages, *common, "--duration", "0.2",
                     "--rounds", "1", "--json", report)  # fmt: skip
    assert result.code == 0, result.err
    assert "multi-exit" in result.out and "single-pass" in result.out
    record = json.loads(report.read_text())
    assert sum(record["exit_shares"]) == pytest.approx(1.0)
    assert record["expected_share"] <= 0.8  # calibrated on these very samples
    assert record["multi_exit"]["throughput_images_per_s"] > 0
    assert record["single_pass"]["batch"] == 32


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("split", "{plain}"), "a multi-exit model has outputs exit_0, exit_1, ..., final"),
        (("calibrate", "{plain}", "--dataset", "photos", "--budget", "0.7"), "multi-exit"),
        (("calibrate", "{two}", "--dataset", "photos", "--budget", "0"), "--budget must be in"),
        (("calibrate", "{two}", "--dataset", "photos", "--budget", "1.5"), "--budget must be in"),
        (("calibrate", "{two}", "--dataset", "photos", "--budget", "0.01"), "no policy meets"),
        (("calibrate", "{two}", "-o", "{two}", "--dataset", "photos", "--budget", ".7"), "input"),
        (("bench", "{two}", "--dataset", "photos"), "no exit thresholds"),
        (("bench", "{missing}", "--dataset", "photos"), "does not exist"),
        (("split", "{two}", "-o", "{two}"), "is not a folder"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path, capsys, args, fragment):
    plain = conv_chain([ConvSpec(4), ConvSpec(4)])
    paths = {
        "plain": tmp_path / "plain.onnx",
        "two": tmp_path / "two.onnx",
        "missing": tmp_path / "missing",
    }
    onnx.save(plain, str(paths["plain"]))
    paths["two"].write_bytes(models["two"].read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(capsys, "exits", *(a.format(**paths) for a in args))
    assert_one_line_error(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_split_into_an_existing_folder_replaces_its_files_whole(models, tmp_path, capsys):
    out = tmp_path / "stages"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    (out / "manifest.json").write_text("old")
    assert run_cli(capsys, "exits", "split", models["one"], "-o", out).code == 0
    assert json.loads((out / "manifest.json").read_text())["policy"]["outputs"] == [
        "exit_0",
        "final",
    ]
    assert (out / "notes.txt").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_rewrites_every_stage_and_calibrate_recalibrates(models, tmp_path, capsys):
    converted = tmp_path / "two.gdws.onnx"
    result = run_cli(capsys, "convert", models["two"], "-o", converted, "--mac-reduction", "1.3")
    assert result.code == 0, result.err
    original, gdws = split_model(models["two"]), split_model(converted)
    assert gdws.policy.full_macs < original.policy.full_macs
    for before, after in zip(original.stages, gdws.stages):
        ops = {node.op_type for node in after.model.graph.node}
        assert after.macs <= before.macs and "Conv" in ops
    assert sum(s.macs for s in gdws.stages) < sum(s.macs for s in original.stages)
    recalibrated = tmp_path / "two.gdws.exits.onnx"
    result = run_cli(capsys, "exits", "calibrate", converted, "--dataset", "photos:train",
                     "--limit", "200", "--budget", "0.8")  # fmt: skip
    assert result.code == 0, result.err
    stored = {p.key: p.value for p in onnx.load(str(recalibrated)).metadata_props}
    policy = ExitPolicy.from_json(stored[METADATA_KEY], "test")
    assert policy.stage_macs == tuple(np.cumsum([s.macs for s in gdws.stages]))


def test_tensorrt_backend_asks_for_the_stage_engines(models, tmp_path, capsys):
    calibrated = tmp_path / "one.exits.onnx"
    run_cli(capsys, "exits", "calibrate", models["one"], "-o", calibrated, "--dataset", "photos",
            "--limit", "64", "--budget", "0.9")  # fmt: skip
    stages = tmp_path / "stages"
    assert run_cli(capsys, "exits", "split", calibrated, "-o", stages).code == 0
    with pytest.raises(GdwsError, match="build it with `gdws-deploy build"):
        StagedModel.open(stages, backend="trt")


@needs_tensorrt_rtx
def test_tensorrt_parser_accepts_every_stage(models, tmp_path, capsys):
    stages = tmp_path / "stages"
    assert run_cli(capsys, "exits", "split", models["skip"], "-o", stages).code == 0
    for model in sorted(stages.glob("*.onnx")):
        assert_parses(model)


@pytest.mark.parametrize(
    "target",
    [["--mac-reduction", "1.5"], ["--max-robust-drop", "0.01", "--allocation", "relative"]],
)
def test_calibrated_convert_of_a_multi_exit_model_is_one_line_and_writes_nothing(
    models, tmp_path, capsys, target
):
    output = tmp_path / "two.gdws.onnx"
    result = run_cli(capsys, "convert", models["two"], "-o", output, *target,
                     "--dataset", "photos:train", "--limit", "16", "--steps", "1")  # fmt: skip
    assert result.code == 2 and "Traceback" not in result.err  # after the progress line:
    assert result.err.strip().splitlines()[-1].startswith("gdws-deploy: error: calibrating")
    assert "one output, this one has 3" in result.err
    assert not list(tmp_path.iterdir())


def test_the_device_runtime_opens_stage_folders_only(models):
    """runtime/ must not import the host's splitter (onnx): a file is a one-line error
    naming the command that makes a folder."""
    with pytest.raises(GdwsError, match="exits split"):
        StagedModel.open(models["two"])
