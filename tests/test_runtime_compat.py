"""Version shims and library selection: what differs between TensorRT 8.5, 10.x and RTX."""

from __future__ import annotations

import importlib.util
import re

import pytest

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.cuda_buffers import open_cuda
from gdws_deploy.runtime.engine_meta import check_engine_version, read_metadata
from gdws_deploy.runtime.trt_compat import (
    ParserIssue,
    TrtVersion,
    explicit_batch_flags,
    load_tensorrt,
    version_tuple,
)
from tests.cli_run import assert_one_line_error, run_cli
from tests.runtime_models import small_cnn


def test_versions_compare_as_numbers_whatever_the_suffix():
    assert version_tuple("8.5.2.2") == (8, 5, 2, 2)
    assert version_tuple("10.0.0b6") == (10, 0, 0)
    assert version_tuple("10.3.0.26") > version_tuple("8.5.2.2")


def test_only_tensorrt_8_needs_the_explicit_batch_flag():
    assert explicit_batch_flags((8, 5, 2, 2), 0) == 1
    assert explicit_batch_flags((10, 3, 0), 0) == 0  # 10.x: deprecated, explicit always
    assert explicit_batch_flags((1, 7, 1), None) == 0  # flag gone (TensorRT-RTX)


def test_engine_from_another_tensorrt_is_refused_naming_both(tmp_path):
    plan = tmp_path / "model.plan"
    (tmp_path / "model.plan.json").write_text(
        '{"tensorrt": {"flavour": "tensorrt", "version": "8.5.2.2"}}'
    )
    metadata = read_metadata(plan)
    check_engine_version(plan, metadata, TrtVersion("tensorrt", "8.5.2.2"))
    with pytest.raises(
        GdwsError, match=re.escape("built by TensorRT 8.5.2.2 but this is TensorRT 10.3.0")
    ):
        check_engine_version(plan, metadata, TrtVersion("tensorrt", "10.3.0"))
    with pytest.raises(GdwsError, match=re.escape("but this is TensorRT-RTX 1.7.1.116")):
        check_engine_version(plan, metadata, TrtVersion("tensorrt_rtx", "1.7.1.116"))
    check_engine_version(tmp_path / "other.plan", read_metadata(tmp_path / "other.plan"), None)


def test_broken_engine_metadata_is_a_clear_error(tmp_path):
    (tmp_path / "model.plan.json").write_text("{not json")
    with pytest.raises(GdwsError, match="unreadable"):
        read_metadata(tmp_path / "model.plan")


def test_parser_issues_read_like_one_line():
    issue = ParserIssue(3, "fancy", "FancyOp", "no importer")
    assert str(issue) == "node 3 fancy (FancyOp): no importer"
    assert str(ParserIssue(3, "", "", "no importer")) == "node 3: no importer"  # TensorRT 8.5


def test_unknown_flavour_or_library_names_are_refused(monkeypatch):
    monkeypatch.setenv("GDWS_TENSORRT", "tensorflow")
    with pytest.raises(GdwsError, match="GDWS_TENSORRT='tensorflow' is not one of"):
        load_tensorrt()
    with pytest.raises(GdwsError, match="GDWS_CUDA_LIBRARY='numba' is not one of"):
        open_cuda("numba")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed")
def test_missing_tensorrt_says_where_it_comes_from(tmp_path, capsys, monkeypatch):
    with pytest.raises(GdwsError, match="comes with JetPack"):
        load_tensorrt("tensorrt")
    monkeypatch.setenv("GDWS_TENSORRT", "tensorrt")
    model = small_cnn(tmp_path / "cnn.onnx")
    done = run_cli(capsys, "build", model, "-o", tmp_path / "cnn.plan")
    assert_one_line_error(done, "TensorRT is not installed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


@pytest.mark.skipif(importlib.util.find_spec("pycuda") is not None, reason="pycuda installed")
def test_missing_pycuda_is_named():
    with pytest.raises(GdwsError, match="pycuda is not installed"):
        open_cuda("pycuda")


@pytest.mark.skipif(importlib.util.find_spec("cuda") is None, reason="cuda-python not installed")
def test_cuda_python_without_a_gpu_fails_in_one_line():
    try:
        library = open_cuda("cuda-python")
    except GdwsError as error:
        assert str(error).startswith(("CUDA is not usable: cudaGetDeviceCount", "no CUDA device"))
        assert "\n" not in str(error)
        return
    library.close()
    pytest.skip("a CUDA device is present: nothing to refuse")
