"""A small CNN trained on sklearn's digits in a second, shared by the robustness tests.

Trained once per test process (lru_cache) and never written outside tmp paths.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from gdws_deploy.robustness.data import load_dataset
from models.export import export_onnx

DIGITS_SHAPE = (1, 1, 8, 8)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the suite runs 2 workers on 2 cores."""
    with torch_threads(1):
        yield


def digits_cnn() -> nn.Module:
    """Conv-BN-ReLU twice (the second strided), linear head: the shape of the real networks."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


@functools.lru_cache(maxsize=None)
def trained_digits_cnn() -> nn.Module:
    """About 98% clean test accuracy after 10 epochs of Adam; returned in eval mode."""
    torch.manual_seed(0)
    train = load_dataset("digits:train")
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch_threads(1):
        for _ in range(10):
            for batch in torch.randperm(len(y)).split(128):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    return model.eval()


def export_trained_digits_cnn(path: Path) -> Path:
    return export_onnx(trained_digits_cnn(), path, input_shape=DIGITS_SHAPE)
