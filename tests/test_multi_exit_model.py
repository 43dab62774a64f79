"""The committed multi-exit model is what its JSON record says it is; its training recipe
is the paper's objective and reproducible."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gdws_deploy.exits.split import split_model
from gdws_deploy.passes.gdws.spectra import onnx_conv_spectra
from gdws_deploy.robustness.attacks import Attack
from gdws_deploy.robustness.data import Dataset, load_dataset
from gdws_deploy.robustness.evaluate import evaluate
from gdws_deploy.robustness.exit_attacks import exit_cross_entropies, exit_view
from gdws_deploy.runtime.staged import exit_names
from models.networks import multi_exit_vgg
from models.train_multi_exit import MultiExitRecipe, rdi_loss
from models.train_robust import build_model, recipe_from_args, train

MODEL = Path(__file__).resolve().parent.parent / "models" / "multi_exit_photos.onnx"
RECORD = json.loads(MODEL.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def test_split():
    return load_dataset(RECORD["dataset"]["test"])


def _recipe(**changes) -> MultiExitRecipe:
    settings = dict(
        dataset="photos",
        seed=3,
        epochs=1,
        batch_size=16,
        lr=0.5,
        weight_decay=5e-4,
        init_scale=0.1,
        eps=4.0,
        train_steps=1,
        eval_steps=1,
        threads=2,
    )
    base = recipe_from_args(argparse.Namespace(**settings))
    return MultiExitRecipe(**{f.name: getattr(base, f.name) for f in fields(base)}, **changes)


def _tiny_photos() -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset("tiny", rng.random((32, 1, 32, 32), dtype=np.float32), np.arange(32) % 10)


def test_model_is_small_enough_to_commit():
    assert MODEL.stat().st_size < 2 * 1024 * 1024


def test_outputs_are_the_exits_in_order_with_a_dynamic_batch():
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.shape == RECORD["input_shape"]
    names = [output.name for output in session.get_outputs()]
    assert names == RECORD["outputs"] == exit_names(3)
    for output in session.get_outputs():
        assert output.shape == [RECORD["input_shape"][0], RECORD["classes"]]


def test_batchnorm_is_folded_like_the_bundled_model():
    ops = {node.op_type for node in onnx.load(str(MODEL)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_clean_accuracy_of_every_exit_matches_the_record(test_split):
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    every = session.run(None, {session.get_inputs()[0].name: test_split.x})
    for logits, entry in zip(every, RECORD["exits"]):
        assert entry["samples"] == len(test_split)
        accuracy = np.mean(logits.argmax(1) == test_split.y)
        # recorded in batches of 128: another batch size may round a near-tie the other way
        assert accuracy == pytest.approx(entry["clean_acc"], abs=0.001), entry["output"]


def test_macs_per_exit_match_the_record():
    policy = split_model(MODEL).policy
    assert list(policy.stage_macs) == [entry["macs"] for entry in RECORD["exits"]]
    assert policy.full_macs == RECORD["full_macs"]
    # exits are cheaper the earlier they are, and only exit 0 is far cheaper than the model
    assert policy.stage_macs[0] < 0.15 * policy.full_macs < policy.stage_macs[1]


def test_final_exit_robust_accuracy_on_a_slice_agrees_with_the_record(test_split):
    torch.set_num_threads(2)
    final = RECORD["exits"][-1]
    weaker = Attack(**{**RECORD["recipe"]["eval_attack"], "steps": 10})
    view = exit_view(onnx.load(str(MODEL)), "final")
    report = evaluate(view, test_split.limit(100), [weaker], seed=0)
    # 100 samples (10 per class): a binomial standard error of about 5 points
    assert report.robust_acc == pytest.approx(final["robust_acc"], abs=0.12)
    assert report.robust_acc < report.clean_acc


def test_kernel_spectra_reproduce_from_the_committed_weights():
    measured = onnx_conv_spectra(onnx.load(str(MODEL)))
    recorded = RECORD["kernel_spectra"]
    assert [r["weight_shape"] for r in measured] == [r["weight_shape"] for r in recorded]
    for got, want in zip(measured, recorded):
        for key in ("top1", "top2", "top3"):
            assert got[key] == pytest.approx(want[key], abs=1e-4)


def test_kernels_are_structured_and_no_longer_their_random_start():
    # An unstructured 3x3 kernel spreads energy evenly: 1/9 per singular value.
    assert min(layer["top1"] for layer in RECORD["kernel_spectra"]) > 3 / 9
    # Past the one-channel stem, training has replaced the random start.
    assert max(RECORD["init_overlap"][1:]) < 0.1


def test_rdi_loss_is_the_weighted_clean_and_adversarial_exit_loss():
    data = _tiny_photos()
    x, y = torch.from_numpy(data.x[:8]), torch.from_numpy(data.y[:8])
    recipe = _recipe(exit_weights=(0.5, 1.0, 2.0), adversarial_share=0.0)
    model = build_model(recipe, data, multi_exit_vgg).eval()
    clean = exit_cross_entropies(model(x), y).mean(0) @ torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(rdi_loss(recipe, model, x, y, torch.arange(8), 0), clean)
    # the adversarial term: at least the clean loss, the attack ascending it
    adversarial = _recipe(exit_weights=(0.5, 1.0, 2.0), adversarial_share=1.0)
    assert rdi_loss(adversarial, model, x, y, torch.arange(8), 0) > clean


def test_same_seed_trains_the_same_weights():
    recipe, data = _recipe(), _tiny_photos()
    first = train(recipe, build_model(recipe, data, multi_exit_vgg), data, rdi_loss)
    second = train(recipe, build_model(recipe, data, multi_exit_vgg), data, rdi_loss)
    reference = second.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_exit_weights_of_the_wrong_count_are_one_line_and_a_failed_exit(tmp_path):
    script = Path(__file__).resolve().parent.parent / "models" / "train_multi_exit.py"
    result = subprocess.run(
        [sys.executable, str(script), "-o", str(tmp_path / "m.onnx"), "--exit-weights", "1,1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "train_multi_exit.py: error: --exit-weights needs 3 numbers, got 1,1"
    )
    assert not list(tmp_path.iterdir())
