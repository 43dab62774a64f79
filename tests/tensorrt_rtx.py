"""TensorRT-RTX (pip install tensorrt-rtx-cu12) parses ONNX models without a GPU: the
check that TensorRT's own parser takes what a pass writes. `gdws-deploy` runs in a
subprocess: importing two TensorRT flavours into one process crashes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_tensorrt_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="tensorrt-rtx-cu12 is not installed (pip install tensorrt-rtx-cu12)",
)


def trt_cli(*args) -> subprocess.CompletedProcess:
    """`gdws-deploy ARGS` with TensorRT-RTX as its TensorRT, in its own process."""
    environment = {**os.environ, "GDWS_TENSORRT": "tensorrt_rtx"}
    command = [sys.executable, "-m", "gdws_deploy.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def assert_parses(model: Path) -> None:
    """TensorRT-RTX's ONNX parser accepts `model`."""
    done = trt_cli("build", model, "--parse-only")
    assert done.returncode == 0, done.stderr
    assert "TensorRT-RTX" in done.stdout and "accepted:" in done.stdout
