"""Reading trtexec logs of TensorRT 8.4, 8.5 and 10.x, and running the trtexec binary."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.trtexec_log import decode_version_tag, parse_trtexec_log
from gdws_deploy.runtime.trtexec_run import find_trtexec
from tests.cli_run import assert_one_line_error, run_cli

DATA = Path(__file__).parent / "data"


def log(name: str) -> str:
    return (DATA / name).read_text()


def test_tensorrt_8_5_xavier_log_parses_every_summary_line():
    summary = parse_trtexec_log(log("trtexec_8.5.2_xavier.log"))
    assert summary.tensorrt_version == "8.5.2"
    assert summary.throughput_qps == 216.486
    assert summary.batch == 32 and summary.images_per_s == pytest.approx(6927.552)
    assert summary.queries == 651 and summary.warmup_queries == 43
    assert list(summary.metrics) == [
        "latency",
        "enqueue_time",
        "h2d_latency",
        "gpu_compute_time",
        "d2h_latency",
    ]
    latency = summary.metrics["latency"]
    assert (latency.min, latency.max, latency.mean, latency.median) == (
        4.51318,
        5.33228,
        4.61722,
        4.60986,
    )
    assert latency.percentiles == ((90.0, 4.65356), (95.0, 4.68506), (99.0, 4.98218))
    assert summary.metrics["gpu_compute_time"].coeff_var == 2.41362
    assert summary.total_host_walltime_s == 3.00713
    assert summary.total_gpu_compute_time_s == 2.92697
    assert summary.warnings[0].startswith("* GPU compute time is unstable")


def test_tensorrt_10_log_with_custom_percentiles_and_spaced_shape_line():
    summary = parse_trtexec_log(log("trtexec_10.3.0_dynamic.log"))
    assert summary.tensorrt_version == "10.3.0"
    assert summary.batch == 64
    assert summary.metrics["d2h_latency"].percentiles == ((50.0, 0.0256348), (99.9, 0.0327148))
    assert summary.metrics["gpu_compute_time"].coeff_var is None
    assert summary.warnings == ()


def test_tensorrt_8_4_log_with_end_to_end_line_implicit_batch_and_version_tag_only():
    summary = parse_trtexec_log(log("trtexec_8.4.0_implicit.log"))
    assert summary.tensorrt_version == "8.4.0"
    assert "end_to_end_host_latency" in summary.metrics
    assert summary.metrics["enqueue_time"].percentiles == ((99.0, 0.127197),)
    # implicit batch: trtexec's qps already counts images
    assert summary.batch == 1 and summary.images_per_s == summary.throughput_qps == 40210.2


def test_both_log_versions_give_the_same_json_keys():
    names = ("8.4.0_implicit", "8.5.2_xavier", "10.3.0_dynamic")
    old, v85, v10 = (set(parse_trtexec_log(log(f"trtexec_{n}.log")).as_dict()) for n in names)
    assert v85 == v10
    assert old == v85 | {"end_to_end_host_latency"}


@pytest.mark.parametrize(
    ("tag", "version"), [(8502, "8.5.2"), (8400, "8.4.0"), (100300, "10.3.0"), (100001, "10.0.1")]
)
def test_version_tags_decode_like_nv_tensorrt_version(tag, version):
    assert decode_version_tag(tag) == version


def test_a_log_without_a_summary_is_a_clear_error():
    text = "&&&& FAILED TensorRT.trtexec [TensorRT v8502] # trtexec --onnx=x.onnx\n"
    with pytest.raises(GdwsError, match="no '=== Performance summary ==='"):
        parse_trtexec_log(text)


def stand_in_trtexec(folder: Path, body: str) -> Path:
    """An executable that answers like trtexec would (a stand-in for NVIDIA's binary)."""
    script = folder / "trtexec"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_trtexec_verb_passes_arguments_and_writes_the_parsed_json(tmp_path, capsys, monkeypatch):
    recorded = DATA / "trtexec_8.5.2_xavier.log"
    monkeypatch.setenv(
        "TRTEXEC", str(stand_in_trtexec(tmp_path, f'echo "args: $*"; cat {recorded}'))
    )
    out = tmp_path / "run.json"
    done = run_cli(capsys, "trtexec", "--json", out, "--loadEngine=m.plan", "--fp16")
    assert done.code == 0, done.err
    assert "args: --loadEngine=m.plan --fp16" in done.out
    assert "216.486 qps" in done.out.splitlines()[-1]
    report = json.loads(out.read_text())
    assert report["command"][1:] == ["--loadEngine=m.plan", "--fp16"]
    assert report["source"] == "trtexec" and report["throughput_qps"] == 216.486


def test_failed_trtexec_run_is_one_line_with_its_error(tmp_path, capsys, monkeypatch):
    error = "[03/14/2023-10:21:07] [E] Error[4]: bad shape"
    monkeypatch.setenv("TRTEXEC", str(stand_in_trtexec(tmp_path, f'echo "{error}"; exit 1')))
    done = run_cli(capsys, "trtexec", "--onnx=x.onnx")
    assert_one_line_error(done, f"trtexec failed: {error}")


def test_missing_trtexec_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TRTEXEC", raising=False)
    if os.access("/usr/src/tensorrt/bin/trtexec", os.X_OK):
        pytest.skip("JetPack's trtexec is installed here")
    with pytest.raises(GdwsError, match="trtexec not found"):
        find_trtexec()
    with pytest.raises(GdwsError, match="not an executable file"):
        find_trtexec(str(tmp_path / "nothing"))


def test_parse_log_verb_prints_the_summary_block(tmp_path, capsys):
    out = tmp_path / "parsed.json"
    done = run_cli(
        capsys, "trtexec", "--parse-log", DATA / "trtexec_10.3.0_dynamic.log", "--json", out
    )
    assert done.code == 0, done.err
    assert done.out.splitlines()[:2] == ["=== Performance summary ===", "Throughput: 936.317 qps"]
    assert json.loads(out.read_text())["tensorrt_version"] == "10.3.0"
    assert_one_line_error(run_cli(capsys, "trtexec", "--parse-log", tmp_path / "x.log"), "x.log")
