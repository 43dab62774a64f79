"""Engines on a real GPU with full TensorRT (a Jetson or a CUDA machine); skipped elsewhere.

These import `tensorrt` into the test process; the TensorRT-RTX tests only ever use it in
subprocesses, so the two flavours never meet in one process.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.engine_build import BuildOptions, build_engine
from gdws_deploy.runtime.runner import OrtRunner
from tests.cli_run import run_cli
from tests.runtime_models import small_cnn

pytestmark = pytest.mark.gpu
PROFILE = {"min_shapes": {"images": (1, 3, 16, 16)}, "max_shapes": {"images": (8, 3, 16, 16)}}
PROFILE["opt_shapes"] = {"images": (4, 3, 16, 16)}


@pytest.fixture(scope="module", autouse=True)
def gpu():
    """Skip unless full TensorRT and a usable CUDA device are here."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("needs full TensorRT (Python module 'tensorrt'), e.g. JetPack on a Jetson")
    from gdws_deploy.runtime.cuda_buffers import open_cuda

    try:
        open_cuda().close()
    except GdwsError as error:
        pytest.skip(f"needs a CUDA GPU: {error}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu")
    model = small_cnn(folder / "cnn.onnx", channels=16, size=16)
    plan = folder / "cnn.plan"
    build_engine(str(model), str(plan), BuildOptions(**PROFILE))
    return model, plan


def run_trt(plan, batch):
    from gdws_deploy.runtime.trt_runner import TrtRunner

    with TrtRunner(plan) as runner:
        return runner.infer(batch)


def test_engine_logits_match_onnxruntime(engine):
    model, plan = engine
    batch = np.random.default_rng(0).uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
    with OrtRunner(model) as ort:
        expected = ort.infer(batch)
    np.testing.assert_allclose(run_trt(plan, batch), expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(run_trt(plan, batch[:1]), expected[:1], rtol=1e-3, atol=1e-4)


def test_batch_outside_the_profile_is_refused(engine):
    with pytest.raises(GdwsError, match="outside the engine's profile"):
        run_trt(engine[1], np.zeros((9, 3, 16, 16), np.float32))


def test_fp16_engine_stays_close_to_fp32(engine, tmp_path):
    model, plan = engine
    half = tmp_path / "cnn.fp16.plan"
    build_engine(str(model), str(half), BuildOptions(fp16=True, **PROFILE))
    batch = np.random.default_rng(1).uniform(-1, 1, (8, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_trt(half, batch), run_trt(plan, batch), atol=2e-2)


@pytest.mark.parametrize("flags", [(), ("--noDataTransfers",), ("--useCudaGraph",)])
def test_gpu_bench_prints_trtexecs_gpu_lines(engine, capsys, flags):
    args = ("bench", engine[1], "--warmUp", "20", "--duration", "0.2", "--batch", "4", *flags)
    done = run_cli(capsys, *args)
    if done.code != 0 and "cannot capture CUDA graphs" in done.err:
        pytest.skip("pycuda cannot capture CUDA graphs; install cuda-python")
    assert done.code == 0, done.err
    for label in ("Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency"):
        assert f"\n{label}: min = " in done.out
    assert "Total GPU Compute Time: " in done.out


def test_int8_calibration_on_digits_writes_and_reuses_its_cache(tmp_path):
    from sklearn.datasets import load_digits

    digits = (load_digits().images[:, None] / 16.0).astype(np.float32)
    model = small_cnn(tmp_path / "digits.onnx", channels=8, size=8, in_channels=1)
    shapes = {"shapes": {"images": (16, 1, 8, 8)}}
    cache = tmp_path / "calib.cache"
    options = BuildOptions(int8=True, calibration_cache=str(cache), calibration_batches=8, **shapes)
    first = build_engine(str(model), str(tmp_path / "a.plan"), options, list(digits[:300]))
    assert first.calibration_batches == 8 and cache.stat().st_size > 0
    again = build_engine(str(model), str(tmp_path / "b.plan"), options, None)
    assert again.plan.stat().st_size > 0


def test_corrupt_engine_is_a_clear_error(tmp_path):
    plan = tmp_path / "broken.plan"
    plan.write_bytes(b"not an engine" * 100)
    with pytest.raises(GdwsError, match="cannot load engine"):
        run_trt(plan, np.zeros((1, 3, 16, 16), np.float32))
