"""trtexec's statistics and summary lines, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.perf_summary import (
    COMPUTE_E,
    COMPUTE_S,
    D2H_E,
    H2D_S,
    MetricStats,
    Trace,
    parse_percentiles,
    percentile_index,
    prolog_lines,
    summarize,
    trace_averages,
    trace_lines,
)
from gdws_deploy.runtime.trtexec_log import parse_trtexec_log


def gpu_rows(h2d, compute, d2h, enqueue, gap=0.0):
    """Back-to-back queries with the given phase durations (ms), like a real GPU trace."""
    rows, clock = [], 0.0
    for a, b, c, e in zip(h2d, compute, d2h, enqueue):
        h2d_s = clock
        c_s = h2d_s + a
        d_s = c_s + b
        rows.append((c_s, c_s + e, h2d_s, c_s, c_s, d_s, d_s, d_s + c))
        clock = d_s + c + gap
    return np.array(rows)


def test_percentiles_follow_trtexec_float32_index_rule():
    # (1 - 0.9f) * 10 is 1.0000002 in float32: trtexec excludes one value, so p90 of 1..10 is 9.
    stats = MetricStats.of(np.arange(1.0, 11.0), (90, 95, 99, 0, 100))
    assert dict(stats.percentiles) == {90.0: 9.0, 95.0: 10.0, 99.0: 10.0, 0.0: 1.0, 100.0: 10.0}
    assert percentile_index(99, 1000) == 990
    assert percentile_index(50, 1) == 0


def test_median_mean_and_coefficient_of_variance():
    even = MetricStats.of(np.array([4.0, 1.0, 3.0, 2.0]), ())
    assert (even.min, even.max, even.mean, even.median) == (1.0, 4.0, 2.5, 2.5)
    assert even.coeff_var == pytest.approx(np.sqrt(1.25) / 2.5 * 100)
    assert MetricStats.of(np.array([3.0, 1.0, 2.0]), ()).median == 2.0


def test_metric_line_is_trtexecs_format():
    stats = MetricStats.of(np.array([0.5, 1.0, 1.5, 2.0]), (90, 95, 99))
    assert stats.line("Latency") == (
        "Latency: min = 0.5 ms, max = 2 ms, mean = 1.25 ms, median = 1.25 ms, "
        "percentile(90%) = 2 ms, percentile(95%) = 2 ms, percentile(99%) = 2 ms"
    )


def test_warmup_queries_are_those_that_started_computing_before_warmup_ends():
    rows = gpu_rows([0.1] * 20, [1.0] * 20, [0.05] * 20, [0.2] * 20)
    trace = Trace.of(rows, warmup_ms=5.0)
    assert trace.warmup_queries == int((rows[:, COMPUTE_S] < 5.0).sum()) == 5
    assert (trace.rows[:, COMPUTE_S] >= 5.0).all()
    assert trace.walltime_ms == pytest.approx(rows[-1, D2H_E] - rows[5, H2D_S])


def test_gpu_summary_uses_trtexec_formulas():
    rng = np.random.default_rng(0)
    h2d, compute = rng.uniform(0.05, 0.1, 200), rng.uniform(1.0, 1.01, 200)
    d2h, enqueue = rng.uniform(0.01, 0.02, 200), rng.uniform(0.1, 0.2, 200)
    rows = gpu_rows(h2d, compute, d2h, enqueue, gap=0.3)
    summary = summarize(Trace.of(rows, warmup_ms=0.0), batch=32)
    walltime_ms = rows[-1, D2H_E] - rows[0, H2D_S]
    assert summary.metrics["latency"].mean == pytest.approx((h2d + compute + d2h).mean())
    assert summary.metrics["gpu_compute_time"].max == pytest.approx(compute.max())
    assert summary.throughput_qps == pytest.approx(200 / walltime_ms * 1000)
    assert summary.total_host_walltime_s == pytest.approx(walltime_ms / 1000)
    assert summary.images_per_s == pytest.approx(32 * summary.throughput_qps)
    assert summary.total_gpu_compute_time_s == pytest.approx(compute.sum() / 1000)
    assert summary.warnings == ()  # compute-bound and stable: trtexec would not warn
    labels = [line.split(":")[0] for line in summary.lines()]
    assert labels == [
        "=== Performance summary ===",
        "Throughput",
        "Throughput",
        "Latency",
        "Enqueue Time",
        "H2D Latency",
        "GPU Compute Time",
        "D2H Latency",
        "Total Host Walltime",
        "Total GPU Compute Time",
    ]


def test_transfer_bound_and_unstable_runs_get_trtexecs_warnings():
    n = 50
    compute = np.where(np.arange(n) % 2, 0.1, 0.3)
    trace = Trace.of(gpu_rows([0.5] * n, compute, [0.5] * n, [0.25] * n), 0.0)
    warnings = " ".join(summarize(trace, batch=1).warnings)
    assert "Enqueue Time" in warnings
    assert "host-to-device" in warnings and "device-to-host" in warnings
    assert "coefficient of variance = 50%" in warnings


def test_cpu_summary_reports_latency_only():
    rows = gpu_rows([0.0] * 30, np.linspace(1, 2, 30), [0.0] * 30, np.linspace(1, 2, 30))
    summary = summarize(Trace.of(rows, 0.0), batch=4, device="cpu")
    assert list(summary.metrics) == ["latency"]
    assert summary.total_gpu_compute_time_s is None and summary.warnings == ()
    assert not any(line.startswith("GPU Compute") for line in summary.lines())


def test_own_summary_block_reads_back_through_the_trtexec_parser():
    rng = np.random.default_rng(1)
    phases = [rng.uniform(0.01, 0.1, 100), rng.uniform(1, 3, 100), rng.uniform(0.01, 0.1, 100)]
    trace = Trace.of(gpu_rows(*phases, rng.uniform(0.1, 0.3, 100)), 0.0)
    summary = summarize(trace, batch=8, percentiles=(50, 99.9))
    parsed = parse_trtexec_log("\n".join(prolog_lines(trace) + summary.lines()))
    assert parsed.batch == 8 and parsed.queries == 100
    assert parsed.throughput_qps == pytest.approx(summary.throughput_qps, rel=1e-5)
    for key, stats in summary.metrics.items():
        assert parsed.metrics[key].median == pytest.approx(stats.median, rel=1e-5)
        assert [p for p, _ in parsed.metrics[key].percentiles] == [50.0, 99.9]


def test_trace_details_average_consecutive_groups():
    rows = gpu_rows([0.0] * 25, np.arange(25.0), [0.0] * 25, [1.0] * 25)
    trace = Trace.of(rows, 0.0)
    averages = trace_averages(trace, 10)
    assert averages.shape == (2, 3)
    assert averages[:, 1].tolist() == [4.5, 14.5]
    assert trace_lines(trace, 10, "gpu")[2] == (
        "Average on 10 runs - GPU latency: 4.5 ms - Host latency: 4.5 ms (enqueue 1 ms)"
    )
    assert prolog_lines(trace)[1].startswith("Timing trace has 25 queries over ")
    assert (trace.rows[:, COMPUTE_E] >= trace.rows[:, COMPUTE_S]).all()


@pytest.mark.parametrize("text", ["", "90,abc", "101", "-1,50"])
def test_bad_percentile_lists_are_refused(text):
    with pytest.raises(GdwsError, match="--percentile"):
        parse_percentiles(text)


def test_empty_trace_is_a_clear_error():
    rows = gpu_rows([0.1] * 3, [1.0] * 3, [0.1] * 3, [0.1] * 3)
    with pytest.raises(GdwsError, match="no timed queries"):
        Trace.of(rows, warmup_ms=1e6)
