"""The committed robust model is what its JSON record says it is."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from gdws_deploy.passes.gdws.spectra import onnx_conv_spectra
from gdws_deploy.robustness.attacks import Attack
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.evaluate import evaluate
from gdws_deploy.robustness.photo_patches import CLASS_NAMES
from models.train_robust import build_model, conv_kernels, init_overlap

MODEL = Path(__file__).resolve().parent.parent / "models" / "robust_photos.onnx"
RECORD = json.loads(MODEL.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def test_split():
    return load_dataset(RECORD["dataset"]["test"])


@pytest.fixture(scope="module")
def session():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])


def test_model_is_small_enough_to_commit():
    assert MODEL.stat().st_size < 2 * 1024 * 1024


def test_input_is_the_recorded_shape_with_a_dynamic_batch(session):
    (model_input,) = session.get_inputs()
    assert model_input.shape == RECORD["input_shape"]
    assert RECORD["classes"] == len(CLASS_NAMES)
    assert session.get_outputs()[0].shape == [RECORD["input_shape"][0], RECORD["classes"]]


def test_clean_accuracy_in_onnxruntime_matches_the_record(session, test_split):
    (logits,) = session.run(None, {session.get_inputs()[0].name: test_split.x})
    accuracy = np.mean(logits.argmax(axis=1) == test_split.y)
    assert len(test_split) == RECORD["test_accuracy"]["samples"]
    # Recorded in batches of 128: another batch size may round a near-tie the other way.
    assert accuracy == pytest.approx(RECORD["test_accuracy"]["clean_acc"], abs=0.001)


def test_robust_accuracy_on_a_slice_agrees_with_the_record(test_split):
    torch.set_num_threads(2)
    recorded = RECORD["recipe"]["eval_attack"]
    # The loader deals classes out in turn: the first 100 hold 10 of each.
    weaker = Attack(**{**recorded, "steps": 10})
    report = evaluate(MODEL, test_split.limit(100), [weaker], seed=0)
    # 100 samples: a binomial standard error of about 5 points; PGD-10 is a little
    # weaker than the recorded PGD-50, never much stronger.
    assert report.robust_acc == pytest.approx(RECORD["test_accuracy"]["robust_acc"], abs=0.12)
    assert report.robust_acc < report.clean_acc - 0.03


def test_kernel_spectra_reproduce_from_the_committed_weights():
    recorded = RECORD["kernel_spectra"]
    measured = onnx_conv_spectra(onnx.load(str(MODEL)))
    assert [r["weight_shape"] for r in measured] == [r["weight_shape"] for r in recorded]
    for got, want in zip(measured, recorded):
        for key in ("top1", "top2", "top3"):
            assert got[key] == pytest.approx(want[key], abs=1e-4)


def test_init_overlap_reproduces_from_the_seed_and_the_committed_weights(test_split):
    recipe = SimpleNamespace(**RECORD["recipe"])
    initial = conv_kernels(build_model(recipe, test_split))
    model = onnx.load(str(MODEL))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    trained = [
        torch.from_numpy(weights[n.input[1]]) for n in model.graph.node if n.op_type == "Conv"
    ]
    np.testing.assert_allclose(init_overlap(trained, initial), RECORD["init_overlap"], atol=2e-4)


def test_kernels_are_structured_and_no_longer_their_random_start():
    # An unstructured 3x3 kernel spreads energy evenly: 1/9 per singular value.
    top1 = [layer["top1"] for layer in RECORD["kernel_spectra"]]
    assert min(top1) > 3 / 9
    # Past the one-channel stem, training has replaced the random start.
    assert max(RECORD["init_overlap"][1:]) < 0.05
