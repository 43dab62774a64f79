"""trtexec's timing loop on a real onnxruntime runner, interleaved comparisons and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gdws_deploy.runtime.benchmark import (
    BenchOptions,
    HostTimedTarget,
    benchmark_pair,
    interleaved_loops,
    timing_loop,
)
from gdws_deploy.runtime.perf_summary import COMPUTE_S, H2D_S, prolog_lines
from gdws_deploy.runtime.runner import OrtRunner
from tests.cli_run import assert_one_line_error, run_cli
from tests.runtime_models import small_cnn

QUICK = ("--warmUp", "0", "--duration", "0", "--iterations", "20")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    light = small_cnn(folder / "light.onnx", channels=4, size=16)
    heavy = small_cnn(folder / "heavy.onnx", channels=48, size=16, layers=3)
    return light, heavy


@pytest.fixture()
def runner(models):
    with OrtRunner(models[0], threads=1) as active:
        yield active


def target(runner, batch=2):
    return HostTimedTarget(runner, np.zeros((batch, 3, 16, 16), np.float32))


def test_loop_times_at_least_the_iterations_after_the_warmup(runner):
    trace = timing_loop(target(runner), BenchOptions(warmup_ms=15, iterations=25, duration_s=0))
    assert len(trace.rows) >= 25
    assert trace.warmup_queries >= 1
    assert (trace.rows[:, COMPUTE_S] >= 15).all()


def test_loop_runs_until_warmup_plus_duration_has_passed(runner):
    trace = timing_loop(target(runner), BenchOptions(warmup_ms=10, iterations=1, duration_s=0.15))
    assert trace.rows[-1, COMPUTE_S] >= 160
    assert trace.walltime_ms >= 150 - (trace.rows[0, H2D_S] - 10)


class RecordingTarget(HostTimedTarget):
    """A real runner's target that notes when its timing blocks start."""

    def __init__(self, runner, label, log):
        super().__init__(runner, np.zeros((1, 3, 16, 16), np.float32))
        self.label, self.log = label, log

    def start(self):
        self.log.append(self.label)
        super().start()


def test_interleaved_blocks_alternate_so_drift_hits_both_models(runner):
    log = []
    pair = [RecordingTarget(runner, "A", log), RecordingTarget(runner, "B", log)]
    traces = interleaved_loops(pair, BenchOptions(warmup_ms=1, iterations=8, duration_s=0), 4)
    # each block warms its model up first: A A B B | B B A A | A A B B | B B A A
    assert "".join(log) == "AABB" + "BBAA" + "AABB" + "BBAA"
    assert all(len(t.rows) >= 8 for t in traces)


def test_interleaved_warmups_are_counted_and_reported(runner):
    pair = [target(runner), target(runner)]
    traces = interleaved_loops(pair, BenchOptions(warmup_ms=2, iterations=4, duration_s=0), 3)
    for trace in traces:  # each of the 3 blocks ran at least one warm-up query
        assert trace.warmup_queries >= 3 and trace.warmup_ms == 6
        queries = trace.warmup_queries
        assert prolog_lines(trace)[0] == f"Warmup completed {queries} queries over 6 ms"


def test_no_warmup_says_so_and_runs_no_warmup_query(runner):
    (trace,) = interleaved_loops([target(runner)], BenchOptions(0, 4, 0), 2)
    assert trace.warmup_queries == 0 and len(trace.rows) == 4
    assert prolog_lines(trace)[0] == "No warm-up (--warmUp 0)"
    alone = timing_loop(target(runner), BenchOptions(warmup_ms=0, iterations=5, duration_s=0))
    assert prolog_lines(alone)[0] == "No warm-up (--warmUp 0)"


def test_compare_measures_the_lighter_model_faster(models):
    with OrtRunner(models[0], threads=1) as light, OrtRunner(models[1], threads=1) as heavy:
        options = BenchOptions(warmup_ms=20, iterations=40, duration_s=0.3, batch=4)
        slow, fast = benchmark_pair([heavy, light], options, {}, rounds=4)
    # ~400x fewer MACs: even on a busy machine the light one answers far more queries
    assert fast.summary.images_per_s > 3 * slow.summary.images_per_s
    assert fast.summary.batch == slow.summary.batch == 4


def test_bench_cli_prints_trtexec_summary_and_writes_json(models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    done = run_cli(capsys, "bench", models[0], *QUICK, "--batch", "4", "--json", out, "--verbose")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0] == "No warm-up (--warmUp 0)"
    assert "=== Trace details ===" in lines
    block = lines[lines.index("=== Performance summary ===") :]
    assert block[1].startswith("Throughput: ") and block[1].endswith(" qps")
    assert block[2].endswith("images/s (batch 4)")
    assert block[3].startswith("Latency: min = ") and "percentile(99%)" in block[3]
    assert block[4].startswith("Total Host Walltime: ")
    report = json.loads(out.read_text())
    assert report["backend"] == "ort" and report["device"] == "cpu" and report["batch"] == 4
    assert report["queries"] >= 20 and set(report["latency"]["percentiles"]) == {"90", "95", "99"}


def test_bench_compare_prints_both_blocks_and_the_ratio(models, tmp_path, capsys):
    out = tmp_path / "compare.json"
    light, heavy = models
    done = run_cli(
        capsys, "bench", heavy, "--compare", light, *QUICK, "--rounds", "2", "--json", out
    )
    assert done.code == 0, done.err
    assert "inputs differ" not in done.err
    assert done.out.count("=== Performance summary ===") == 2
    ratio_line = done.out.strip().splitlines()[-1]
    assert ratio_line.startswith("Throughput ratio (light.onnx / heavy.onnx): ")
    report = json.loads(out.read_text())
    expected = (
        report["compare"]["throughput_images_per_s"] / report["model"]["throughput_images_per_s"]
    )
    assert report["throughput_ratio"] == pytest.approx(expected)
    assert ratio_line.endswith(f"{report['throughput_ratio']:.3f}x")


def test_compare_of_models_with_different_inputs_warns_beside_the_ratio(models, tmp_path, capsys):
    wide = small_cnn(tmp_path / "wide.onnx", channels=4, size=32)
    out = tmp_path / "compare.json"
    done = run_cli(capsys, "bench", models[0], "--compare", wide, *QUICK, "--json", out)
    assert done.code == 0, done.err
    warning = (
        "Warning: inputs differ: light.onnx 1x3x16x16 vs wide.onnx 1x3x32x32: "
        "the ratio compares different work"
    )
    assert done.err.splitlines() == [warning]
    assert "Throughput ratio (wide.onnx / light.onnx): " in done.out
    report = json.loads(out.read_text())
    assert report["warnings"] == [warning]
    assert report["compare"]["input_shape"] == [1, 3, 32, 32]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--useCudaGraph",), "need the TensorRT backend, not ort"),
        (("--percentile", "90,101"), "--percentile"),
        (("--iterations", "0"), "--iterations must be at least 1"),
        (("--warmUp", "fast"), "--warmUp must be a number"),
        (("--batch", "2", "--shapes", "images:1x3x8x8"), "fixed size 16 on axis 2"),
        (("--min-shapes", "images:1x3x16x16"), "use --shapes"),
        (("--fp16",), "--fp16 applies to the TensorRT backend"),
    ],
)
def test_bench_bad_flags_are_one_line_errors(models, capsys, flags, message):
    assert_one_line_error(run_cli(capsys, "bench", models[0], *QUICK, *flags), message)


def test_bench_help_names_the_thread_count_n(capsys):
    done = run_cli(capsys, "bench", "--help")
    line = next(line for line in done.out.splitlines() if "--threads" in line)
    assert line.split()[:2] == ["--threads", "N"], line


def test_bench_refuses_missing_files_unknown_suffixes_and_engines_on_ort(tmp_path, capsys):
    assert_one_line_error(run_cli(capsys, "bench", tmp_path / "none.onnx"), "no such file")
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"\0")
    assert_one_line_error(run_cli(capsys, "bench", odd), "cannot tell the backend")
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"\0")
    assert_one_line_error(run_cli(capsys, "bench", engine, "--backend", "ort"), "runs ONNX models")
