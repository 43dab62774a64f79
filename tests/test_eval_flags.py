"""What `eval` says about its data flags: a --limit beyond the data is named, not silent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from digits_fixtures import export_trained_digits_cnn, torch_threads

from gdws_deploy.robustness.data import load_dataset
from tests.cli_run import run_cli


@pytest.fixture(scope="module")
def digits_32(tmp_path_factory):
    """The digits model and the first 32 digits test samples as an npz."""
    folder = tmp_path_factory.mktemp("eval-flags")
    data = load_dataset("digits", limit=32)
    np.savez(folder / "digits32.npz", x=data.x, y=data.y)
    return export_trained_digits_cnn(folder / "digits.onnx"), folder / "digits32.npz"


def test_limit_beyond_the_data_warns_once_and_uses_all(digits_32, tmp_path, capsys):
    model, npz = digits_32
    with torch_threads(1):
        result = run_cli(
            capsys, "eval", model, "--dataset", f"npz:{npz}", "--limit", 1000,
            "--eps", "0.4/255", "--step-size", "0.1/255", "--steps", 1,
            "--json", tmp_path / "report.json",
        )  # fmt: skip
    assert result.code == 0, result.err
    warning = f"--limit 1000 > 32 samples in npz:{npz}: using all 32"
    assert [line for line in result.err.splitlines() if "--limit" in line] == [warning]
    assert json.loads((tmp_path / "report.json").read_text())["samples"] == 32


def test_limit_within_the_data_says_nothing(capsys):
    assert len(load_dataset("digits", limit=32)) == 32
    assert capsys.readouterr().err == ""


def test_limit_on_data_ordered_by_class_warns_that_classes_are_missing(tmp_path, capsys):
    """The shared photo crops are stored class by class: --limit takes the first N, which
    then hold a few classes only, and the user must hear it."""
    path = tmp_path / "ordered.npz"
    labels = np.repeat(np.arange(4), 5)
    np.savez(path, x=np.zeros((20, 1, 4, 4), np.float32), y=labels)
    assert len(load_dataset(f"npz:{path}", limit=10)) == 10
    assert capsys.readouterr().err.splitlines() == [
        f"--limit 10: the first 10 samples of npz:{path} hold only 2 of its 4 classes "
        "(is it ordered by class?)"
    ]
    shuffled = tmp_path / "shuffled.npz"
    np.savez(shuffled, x=np.zeros((20, 1, 4, 4), np.float32), y=np.tile(np.arange(4), 5))
    assert len(load_dataset(f"npz:{shuffled}", limit=10)) == 10
    assert capsys.readouterr().err == ""
