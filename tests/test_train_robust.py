from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gdws_deploy.robustness.data import Dataset
from models.train_robust import (
    build_model,
    conv_kernels,
    init_overlap,
    load_split,
    recipe_from_args,
    train,
)


def _recipe(**changes):
    settings = dict(
        dataset="photos",
        seed=3,
        epochs=1,
        batch_size=32,
        lr=0.05,
        weight_decay=5e-4,
        init_scale=0.1,
        eps=4.0,
        train_steps=1,
        eval_steps=1,
        threads=2,
    )
    return recipe_from_args(argparse.Namespace(**{**settings, **changes}))


def _tiny_photos() -> Dataset:
    """Random images: training mechanics do not need real data, and these load instantly."""
    rng = np.random.default_rng(0)
    x = rng.random((48, 1, 32, 32), dtype=np.float32)
    return Dataset("tiny", x, np.arange(48) % 10)


@pytest.fixture(scope="module")
def twice_trained():
    """Two runs of one recipe: (first model, its initial conv kernels, second model)."""
    recipe, data = _recipe(epochs=2, lr=0.5), _tiny_photos()
    first = build_model(recipe, data)
    initial = conv_kernels(first)
    return train(recipe, first, data), initial, train(recipe, build_model(recipe, data), data)


def test_same_seed_trains_the_same_weights(twice_trained):
    first, _, second = twice_trained
    reference = second.state_dict()
    for name, value in first.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_init_scale_changes_no_output_but_through_batchnorm_epsilon():
    data = _tiny_photos()
    x = torch.from_numpy(data.x[:16])
    small = build_model(_recipe(init_scale=0.1), data).train()
    default = build_model(_recipe(init_scale=1.0), data).train()
    for norm in [*small.modules(), *default.modules()]:
        if isinstance(norm, nn.BatchNorm2d):
            norm.eps = 1e-12
    with torch.no_grad():
        np.testing.assert_allclose(small(x), default(x), rtol=1e-4, atol=1e-5)
    for kernel, original in zip(conv_kernels(small), conv_kernels(default)):
        torch.testing.assert_close(kernel, original * 0.1)


def test_init_overlap_is_one_at_the_start_and_falls_with_training(twice_trained):
    trained, initial, _ = twice_trained
    untrained = build_model(_recipe(epochs=2, lr=0.5), _tiny_photos())
    np.testing.assert_allclose(init_overlap(conv_kernels(untrained), initial), 1.0, atol=1e-6)
    assert np.mean(init_overlap(conv_kernels(trained), initial)) < 0.99


def test_init_overlap_ignores_a_scale_per_output_channel():
    rng = torch.Generator().manual_seed(0)
    start = torch.randn(8, 4, 3, 3, generator=rng)
    moved = start + 0.5 * torch.randn(8, 4, 3, 3, generator=rng)
    scales = torch.linspace(-2, 3, 8)[:, None, None, None]
    scaled = init_overlap([moved * scales], [start])
    np.testing.assert_allclose(scaled, init_overlap([moved], [start]), atol=1e-4)


def test_digits_are_upsampled_to_the_photo_size_and_keep_their_range():
    digits = load_split("digits", "test")
    assert digits.x.shape[1:] == (1, 32, 32)
    assert digits.x.min() >= 0 and digits.x.max() <= 1
    assert digits.name == "digits:test@32x32"


def test_a_missing_output_folder_is_one_line_and_a_failed_exit(tmp_path):
    script = Path(__file__).resolve().parent.parent / "models" / "train_robust.py"
    missing = tmp_path / "no-such-folder" / "model.onnx"
    result = subprocess.run(
        [sys.executable, str(script), "-o", str(missing)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"train_robust.py: error: output directory {missing.parent} does not exist"
    )
    assert not missing.parent.exists()
