"""Bad input to every verb ends in one error line, a non-zero exit and nothing left behind.

Each case runs in its own folder holding a copy of every input (a small real model, broken
models, bad data and alphas files) and checks the folder afterwards: the same files with the
same bytes, so no output, half-written temporary (.NAME.XXXX.tmp) or staging folder was left
and no input was touched. Only the command line is used, so this pins what a user sees.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np
import onnx
import pytest

from tests.cli_run import CliResult, run_cli
from tests.conv_models import ConvSpec, conv_chain


class Case(NamedTuple):
    id: str
    args: Tuple[str, ...]  # run in the case's folder, which holds the files of `inputs`
    message: Union[str, Tuple[str, ...]]  # a fragment of the one error line, or alternatives


def _model() -> onnx.ModelProto:
    """Two Convs (the second convertible) and a class head, on digits-shaped images."""
    return conv_chain([ConvSpec(8, weights="random"), ConvSpec(8)], (1, 8, 8), dense_head=True)


def _rejected() -> onnx.ModelProto:
    """The same model with one Conv reading a tensor nothing produces: the checker refuses."""
    model = _model()
    model.graph.node[0].input[0] = "nowhere"
    return model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input file the cases use, written once per module."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    whole = _model().SerializeToString()
    (folder / "model.onnx").write_bytes(whole)
    (folder / "truncated.onnx").write_bytes(whole[: len(whole) // 2])
    (folder / "text.onnx").write_text("a text file, not a model\n")
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "rejected.onnx").write_bytes(_rejected().SerializeToString())
    (folder / "a-file").write_text("a regular file, not a folder\n")
    (folder / "text.npz").write_text("x,y\n0,1\n")
    (folder / "text.plan").write_text("not an engine\n")
    (folder / "a-folder").mkdir()
    images = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    labels = np.arange(4)
    np.savez(folder / "wrong-keys.npz", images=images, labels=labels)
    np.savez(folder / "wrong-shape.npz", x=images[:, 0], y=labels)
    np.savez(folder / "short-labels.npz", x=images, y=labels[:3])
    np.savez(folder / "wrong-alphas.npz", conv1=np.ones((3, 3), np.float32))
    return folder


DATA = ("--dataset", "digits", "--limit", "4", "--steps", "1")
NO_NUMBER = "is not a number or fraction like 8/255"
CASES = [
    # convert: the model file
    Case("convert-missing-file", ("convert", "missing.onnx"), "missing.onnx does not exist"),
    Case("convert-folder-as-model", ("convert", "a-folder"), "a-folder is not a file"),
    Case(
        "convert-truncated-onnx",
        ("convert", "truncated.onnx"),
        "truncated.onnx is not a readable ONNX model",
    ),
    Case(
        "convert-text-file-named-onnx",
        ("convert", "text.onnx"),
        "text.onnx is not a readable ONNX model",
    ),
    Case("convert-empty-file", ("convert", "empty.onnx"), "empty.onnx is empty"),
    Case(
        "convert-checker-rejects",
        ("convert", "rejected.onnx"),
        "input 'nowhere' of node: name: conv0 OpType: Conv is not output of any previous nodes",
    ),
    # convert: the output
    Case(
        "convert-output-is-input",
        ("convert", "model.onnx", "-o", "model.onnx"),
        "output model.onnx is the input file",
    ),
    Case(
        "convert-output-in-missing-folder",
        ("convert", "model.onnx", "-o", "no/x.onnx"),
        "output directory no does not exist",
    ),
    Case(
        "convert-output-under-a-file",
        ("convert", "model.onnx", "-o", "a-file/x.onnx"),
        "output directory a-file is a file, not a folder",
    ),
    Case(
        "convert-output-is-a-folder",
        ("convert", "model.onnx", "-o", "a-folder"),
        "output a-folder is a folder; give a file path",
    ),
    # convert: targets
    Case(
        "convert-mac-reduction-below-1",
        ("convert", "model.onnx", "--mac-reduction", "0.5"),
        "MAC reduction must be a finite number >= 1, got 0.5",
    ),
    Case(
        "convert-mac-reduction-not-a-number",
        ("convert", "model.onnx", "--mac-reduction", "abc"),
        "--mac-reduction must be a number (float), got 'abc'",
    ),
    Case(
        "convert-negative-beta",
        ("convert", "model.onnx", "--beta", "-1"),
        "beta must be a finite number >= 0, got -1.0",
    ),
    Case(
        "convert-budget-0",
        ("convert", "model.onnx", "--budget", "0"),
        "budget must be a whole number of kernels >= 1, got 0",
    ),
    Case(
        "convert-speedup-without-tune",
        ("convert", "model.onnx", "--speedup", "2"),
        "--speedup and --speed-ratio are measured: give --tune ort|trt too",
    ),
    Case(
        "convert-speed-ratio-without-mac-reduction",
        ("convert", "model.onnx", "--tune", "ort", "--speed-ratio", "0.8"),
        "--speed-ratio is a share of the MAC reduction: give --mac-reduction too",
    ),
    Case(
        "convert-flag-without-value",
        ("convert", "model.onnx", "--beta"),
        "Option '--beta' requires an argument. (see 'gdws-deploy convert --help')",
    ),
    Case(
        "convert-two-targets",
        ("convert", "model.onnx", "--beta", "0.1", "--budget", "2"),
        "give exactly one of beta, budget, mac_reduction (got beta, budget)",
    ),
    Case(
        "convert-include-matches-nothing",
        ("convert", "model.onnx", "--include", "nope*"),
        "--include matched no Conv (names are: conv0, conv1)",
    ),
    Case(
        "convert-alphas-text-file",
        ("convert", "model.onnx", "--alphas", "text.npz"),
        "cannot read alphas from text.npz: not an npz archive",
    ),
    Case(
        "convert-alphas-wrong-shape",
        ("convert", "model.onnx", "--alphas", "wrong-alphas.npz"),
        "alphas for 'conv1' have shape (3, 3), expected (8,)",
    ),
    Case(
        "convert-unknown-dataset-kind",
        ("convert", "model.onnx", "--max-robust-drop", "0.01", "--dataset", "mnist"),
        "unknown dataset 'mnist'; known: cifar10, digits, npz, photos, svhn",
    ),
    # eval: data
    Case(
        "eval-unknown-dataset-kind",
        ("eval", "model.onnx", "--dataset", "nope:x"),
        "unknown dataset 'nope:x'",
    ),
    Case(
        "eval-npz-missing",
        ("eval", "model.onnx", "--dataset", "npz:missing.npz"),
        "missing.npz does not exist",
    ),
    Case(
        "eval-npz-text-file",
        ("eval", "model.onnx", "--dataset", "npz:text.npz"),
        "text.npz is not an npz archive",
    ),
    Case(
        "eval-npz-wrong-keys",
        ("eval", "model.onnx", "--dataset", "npz:wrong-keys.npz"),
        "wrong-keys.npz has no array named 'x' (needs x and y)",
    ),
    Case(
        "eval-npz-wrong-shape",
        ("eval", "model.onnx", "--dataset", "npz:wrong-shape.npz"),
        "images must be (N, C, H, W), got shape (4, 8, 8)",
    ),
    Case(
        "eval-npz-fewer-labels-than-images",
        ("eval", "model.onnx", "--dataset", "npz:short-labels.npz"),
        "4 images but 3 labels",
    ),
    Case(
        "eval-limit-0",
        ("eval", "model.onnx", "--dataset", "digits", "--limit", "0"),
        "Invalid value for '--limit': 0 is not in the range x>=1.",
    ),
    # eval: attack and backend
    Case("eval-eps-not-a-number", ("eval", "model.onnx", *DATA, "--eps", "x/3"), NO_NUMBER),
    Case("eval-eps-divides-by-0", ("eval", "model.onnx", *DATA, "--eps", "1/0"), NO_NUMBER),
    Case(
        "eval-step-size-divides-by-0",
        ("eval", "model.onnx", *DATA, "--step-size", "1/0"),
        f"--step-size '1/0' {NO_NUMBER}",
    ),
    Case(
        "eval-unknown-attack",
        ("eval", "model.onnx", *DATA, "--attack", "fgsm"),
        "unknown attack 'fgsm' (choose from pgd-linf,",
    ),
    Case(
        "eval-trt-without-engine",
        ("eval", "model.onnx", *DATA, "--backend", "trt"),
        "backend trt runs a serialized engine: give --engine",
    ),
    Case(
        "eval-unknown-backend",
        ("eval", "model.onnx", *DATA, "--backend", "nope"),
        "unknown backend 'nope' (choose from ort, trt)",
    ),
    Case(
        "eval-json-under-a-file",
        ("eval", "model.onnx", *DATA, "--json", "a-file/report.json"),
        "output directory a-file is a file, not a folder",
    ),
    Case(
        "eval-json-is-a-folder",
        ("eval", "model.onnx", *DATA, "--json", "a-folder"),
        "output a-folder is a folder; give a file path",
    ),
    # alphas
    Case(
        "alphas-eps-not-a-number",
        ("alphas", "model.onnx", "-o", "a.npz", *DATA, "--eps", "x/3"),
        f"--eps 'x/3' {NO_NUMBER}",
    ),
    Case(
        "alphas-output-is-input",
        ("alphas", "model.onnx", "-o", "model.onnx", *DATA),
        "output model.onnx is the input file",
    ),
    Case(
        "alphas-output-is-a-folder",
        ("alphas", "model.onnx", "-o", "a-folder", *DATA),
        "output a-folder is a folder; give a file path",
    ),
    Case(
        "alphas-text-file-model",
        ("alphas", "text.onnx", "-o", "a.npz", *DATA),
        "text.onnx is not a readable ONNX model",
    ),
    # sweep
    Case(
        "sweep-mac-reductions-not-numbers",
        ("sweep", "model.onnx", *DATA, "--mac-reductions", "2,x"),
        "--mac-reductions must be comma-separated numbers, got '2,x'",
    ),
    Case(
        "sweep-mac-reductions-below-1",
        ("sweep", "model.onnx", *DATA, "--mac-reductions", "0.5"),
        "MAC reductions must be >= 1, got 0.5",
    ),
    Case(
        "sweep-out-is-a-file",
        ("sweep", "model.onnx", *DATA, "--out", "a-file"),
        "--out a-file exists and is not a folder",
    ),
    # bench (engines run in a subprocess, below), trtexec
    Case(
        "bench-missing-engine", ("bench", "missing.plan"), "cannot read missing.plan: no such file"
    ),
    Case(
        "bench-text-file-onnx",
        ("bench", "text.onnx"),
        "onnxruntime cannot load the model",
    ),
    Case(
        "bench-json-is-a-folder",
        ("bench", "model.onnx", "--json", "a-folder", "--warmUp", "0", "--duration", "0"),
        "output a-folder is a folder; give a file path",
    ),
    Case(
        "trtexec-flags-with-a-saved-log",
        ("trtexec", "--parse-log", "a-file", "--fp16"),
        "--parse-log reads a saved log; it takes no trtexec arguments",
    ),
    Case(
        "trtexec-log-without-summary",
        ("trtexec", "--parse-log", "a-file"),
        "no '=== Performance summary ===' in the trtexec output",
    ),
    Case(
        "trtexec-path-not-executable",
        ("trtexec", "--trtexec-path", "a-file", "--no-such-flag"),
        "trtexec a-file is not an executable file",
    ),
    Case(
        "trtexec-flag-without-value",
        ("trtexec", "--json"),
        "Option '--json' requires an argument. (see 'gdws-deploy trtexec --help')",
    ),
    Case(
        "trtexec-parse-log-missing",
        ("trtexec", "--parse-log", "missing.log"),
        "cannot read missing.log: No such file or directory",
    ),
]


def snapshot(folder: Path) -> Dict[str, Optional[bytes]]:
    """Every file (hidden ones too) with its bytes and every folder (None), by relative path."""
    found: Dict[str, Optional[bytes]] = {}
    for root, folders, files in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = Path(path).read_bytes()
    return found


def assert_failed_in_one_line(result: CliResult, message: Union[str, Tuple[str, ...]]) -> None:
    """Non-zero exit, no traceback, one stderr line: a GdwsError or click's usage error."""
    lines = result.err.strip().splitlines()
    assert result.code != 0, result
    assert "Traceback" not in result.out + result.err, result.err
    assert len(lines) == 1 and lines[0].startswith("gdws-deploy: error: "), result.err
    alternatives = (message,) if isinstance(message, str) else message
    assert any(fragment in lines[0] for fragment in alternatives), lines[0]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_in_one_line_and_leaves_the_folder_as_it_was(
    case, inputs, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "case"
    shutil.copytree(inputs, folder)
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    result = run_cli(capsys, *case.args)
    assert_failed_in_one_line(result, case.message)
    assert snapshot(folder) == before


TENSORRT_CASES = [
    Case(
        "build-text-file",
        ("build", "text.onnx", "-o", "text.plan"),
        "text.onnx is not a valid ONNX model (TensorRT's parser: ",
    ),
    # no GPU: CUDA is named; with one, TensorRT's reason for refusing the file
    Case("bench-text-file-engine", ("bench", "text.plan"), ("CUDA is not usable", "text.plan")),
]


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="tensorrt-rtx-cu12 is not installed (pip install tensorrt-rtx-cu12)",
)
@pytest.mark.parametrize("case", TENSORRT_CASES, ids=[case.id for case in TENSORRT_CASES])
def test_bad_input_to_tensorrt_fails_in_one_line_and_leaves_the_folder_as_it_was(
    case, inputs, tmp_path
):
    """In a subprocess: importing two TensorRT flavours into one process crashes."""
    folder = tmp_path / "case"
    shutil.copytree(inputs, folder)
    before = snapshot(folder)
    done = subprocess.run(
        [sys.executable, "-m", "gdws_deploy.cli", *case.args],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**os.environ, "GDWS_TENSORRT": "tensorrt_rtx"},
        timeout=120,
    )
    assert_failed_in_one_line(CliResult(done.returncode, done.stdout, done.stderr), case.message)
    assert snapshot(folder) == before
