"""TensorRT's own ONNX parser and ahead-of-time engine build, run on this CPU-only machine.

TensorRT-RTX (pip install tensorrt-rtx-cu12) parses and builds engines without a GPU. Each
test runs `gdws-deploy` in a subprocess: importing two TensorRT flavours into one process
crashes, so the test process itself never imports TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.runtime_models import foreign_op_graph, gdws_cnn, small_cnn
from tests.tensorrt_rtx import needs_tensorrt_rtx, trt_cli

pytestmark = needs_tensorrt_rtx
DYNAMIC = ("--min-shapes", "images:1x4x8x8", "--opt-shapes", "images:8x4x8x8")
DYNAMIC += ("--max-shapes", "images:32x4x8x8")


def one_line_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_parser_accepts_a_small_cnn_and_the_gdws_triple(tmp_path):
    for model in (small_cnn(tmp_path / "cnn.onnx"), gdws_cnn(tmp_path / "gdws.onnx")):
        done = trt_cli("build", model, "--parse-only")
        assert done.returncode == 0, done.stderr
        assert "TensorRT-RTX" in done.stdout and "accepted:" in done.stdout
        assert "input images: ?x" in done.stdout


def test_parse_only_lists_the_node_tensorrt_cannot_import(tmp_path):
    done = trt_cli("build", foreign_op_graph(tmp_path / "foreign.onnx"), "--parse-only")
    assert "rejects 1 node(s)" in one_line_error(done)
    row = next(line for line in done.stdout.splitlines() if "fancy" in line)
    assert "FancyOp" in row and row.split()[1] == "1"  # node index 1


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"a text file, not a model\n", "without outputs"),  # decodes as an empty model
        (b"", "without outputs"),
        ("truncated", "Failed to parse the ONNX model"),
    ],
)
def test_a_file_that_is_no_onnx_model_is_named_as_such(tmp_path, content, reason):
    if content == "truncated":  # a download cut in half
        content = small_cnn(tmp_path / "whole.onnx").read_bytes()[:-700]
        (tmp_path / "whole.onnx").unlink()
    fake = tmp_path / "text.onnx"
    fake.write_bytes(content)
    for flags in (("-o", tmp_path / "text.plan"), ("--parse-only",)):
        line = one_line_error(trt_cli("build", fake, *flags))
        assert f"{fake} is not a valid ONNX model (TensorRT's parser: " in line
        assert reason in line
    assert [p.name for p in tmp_path.iterdir()] == ["text.onnx"]


def test_ahead_of_time_build_writes_engine_metadata_and_timing_cache(tmp_path):
    model = gdws_cnn(tmp_path / "gdws.onnx")
    plan, cache = tmp_path / "gdws.plan", tmp_path / "timing.cache"
    done = trt_cli(
        "build", model, "-o", plan, *DYNAMIC, "--workspace", "64", "--timing-cache", cache
    )
    assert done.returncode == 0, done.stderr
    assert plan.stat().st_size > 1000 and cache.stat().st_size > 0
    meta = json.loads(Path(f"{plan}.json").read_text())
    assert meta["tensorrt"]["flavour"] == "tensorrt_rtx" and meta["precision"] == "fp32"
    assert meta["source"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert meta["profiles"]["images"] == {
        "min": [1, 4, 8, 8],
        "opt": [8, 4, 8, 8],
        "max": [32, 4, 8, 8],
    }
    assert meta["inputs"]["images"] == [-1, 4, 8, 8] and meta["workspace_mib"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gdws.onnx",
        "gdws.plan",
        "gdws.plan.json",
        "timing.cache",
    ]


def test_engine_of_another_tensorrt_version_and_missing_gpu_are_one_line(tmp_path):
    plan = tmp_path / "cnn.plan"
    assert trt_cli("build", small_cnn(tmp_path / "cnn.onnx"), "-o", plan).returncode == 0
    # no GPU here: the runner gets as CUDA and stops with one line
    assert "CUDA" in one_line_error(trt_cli("bench", plan))
    on_the_fly = trt_cli("bench", tmp_path / "cnn.onnx", "--backend", "trt", "--batch", "4")
    assert "CUDA" in one_line_error(on_the_fly)  # built in a temporary folder first
    meta_path = Path(f"{plan}.json")
    meta = json.loads(meta_path.read_text())
    meta["tensorrt"] = {"flavour": "tensorrt", "version": "8.5.2.2"}
    meta_path.write_text(json.dumps(meta))
    line = one_line_error(trt_cli("bench", plan))
    assert "built by TensorRT 8.5.2.2 but this is TensorRT-RTX" in line


def test_precision_and_dla_requests_tensorrt_rtx_cannot_honour_fail_cleanly(tmp_path):
    model = small_cnn(tmp_path / "cnn.onnx")
    fp16 = one_line_error(trt_cli("build", model, "-o", tmp_path / "a.plan", "--fp16"))
    assert "no FP16 builder flag" in fp16
    dla = trt_cli("build", model, "-o", tmp_path / "b.plan", "--fp16", "--useDLACore", "1")
    assert "sees 0 DLA core(s)" in one_line_error(dla)
    assert not any(p.suffix == ".plan" for p in tmp_path.iterdir())


@pytest.mark.slow
def test_converted_preact_resnet18_parses_and_builds(tmp_path):
    export = pytest.importorskip("models.export", reason="models/export.py not available")
    convert = pytest.importorskip(
        "gdws_deploy.pipeline.convert", reason="convert pass not available"
    )
    original = export.export_architecture("preactresnet18", tmp_path / "preact18.onnx")
    converted = tmp_path / "preact18.gdws.onnx"
    report, written = convert.convert_file(
        original, converted, mac_reduction=2.0, check_parity=False
    )
    assert written and report.converted > 0
    plan = tmp_path / "preact18.gdws.plan"
    shapes = ("--min-shapes", "input:1x3x32x32", "--max-shapes", "input:64x3x32x32")
    done = trt_cli("build", converted, "-o", plan, *shapes, "--opt-shapes", "input:32x3x32x32")
    assert done.returncode == 0, done.stderr
    assert plan.stat().st_size > 0
