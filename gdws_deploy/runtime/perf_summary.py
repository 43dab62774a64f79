"""trtexec's performance statistics and its "=== Performance summary ===" block.

The formulas are trtexec's (TensorRT 8.5 and 10 print the same summary): per query,
Latency = H2D + GPU Compute + D2H; Throughput = queries / Total Host Walltime, the walltime
running from the first measured query's H2D start to the last one's D2H end; percentile p
is the sorted value at index max(n - 1 - floor((1 - p/100) n), 0); the median averages the
two middle values; the coefficient of variance uses the population standard deviation.
Numbers print like C++ streams (6 significant digits), so a trtexec log parser reads ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError

# Columns of a timing trace, each in ms from the start of the run.
ENQ_S, ENQ_E, H2D_S, H2D_E, COMPUTE_S, COMPUTE_E, D2H_S, D2H_E = range(8)

# JSON key -> the label trtexec prints, in trtexec's order.
METRIC_LABELS = {
    "latency": "Latency",
    "end_to_end_host_latency": "End-to-End Host Latency",
    "enqueue_time": "Enqueue Time",
    "h2d_latency": "H2D Latency",
    "gpu_compute_time": "GPU Compute Time",
    "d2h_latency": "D2H Latency",
}
DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)
ENQUEUE_BOUND_RATIO = 0.8
UNSTABLE_COEFF_VAR = 1.0


def fmt(value: float) -> str:
    """A number as `std::ostream << float` writes it (trtexec's format)."""
    return format(float(value), "g")


def parse_percentiles(text: str) -> Tuple[float, ...]:
    """'90,95,99' -> (90.0, 95.0, 99.0); each in [0, 100] as trtexec requires."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or any(not 0.0 <= v <= 100.0 for v in values):
        raise GdwsError(f"--percentile: {text!r} is not a list like 90,95,99 of values in [0,100]")
    return values


def percentile_index(percentile: float, n: int) -> int:
    """trtexec's index into n sorted values, in its float32 arithmetic (p90 of 10 is the 9th)."""
    one, hundred = np.float32(1), np.float32(100)
    exclude = int((one - np.float32(percentile) / hundred) * np.float32(n))
    return max(n - 1 - exclude, 0)


@dataclass(frozen=True)
class MetricStats:
    """min/max/mean/median/percentiles of one metric, in ms."""

    min: float
    max: float
    mean: float
    median: float
    percentiles: Tuple[Tuple[float, float], ...]
    coeff_var: Optional[float] = None

    @classmethod
    def of(cls, values: np.ndarray, percentiles: Sequence[float]) -> MetricStats:
        ordered = np.sort(np.asarray(values, dtype=np.float64))
        n = len(ordered)
        if n == 0:
            raise GdwsError("no timed queries to summarize; raise --iterations or --duration")
        mean = float(ordered.mean())
        middle = n // 2
        median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        picked = tuple((float(p), float(ordered[percentile_index(p, n)])) for p in percentiles)
        spread = float(np.sqrt(np.mean((ordered - mean) ** 2)))
        coeff_var = spread / mean * 100 if mean else float("inf")
        return cls(float(ordered[0]), float(ordered[-1]), mean, float(median), picked, coeff_var)

    def line(self, label: str) -> str:
        text = (
            f"{label}: min = {fmt(self.min)} ms, max = {fmt(self.max)} ms, "
            f"mean = {fmt(self.mean)} ms, median = {fmt(self.median)} ms"
        )
        return text + "".join(f", percentile({fmt(p)}%) = {fmt(v)} ms" for p, v in self.percentiles)

    def as_dict(self) -> Dict[str, Any]:
        data = {"min": self.min, "max": self.max, "mean": self.mean, "median": self.median}
        data["percentiles"] = {fmt(p): v for p, v in self.percentiles}
        if self.coeff_var is not None:
            data["coeff_var_percent"] = self.coeff_var
        return data


@dataclass(frozen=True)
class Trace:
    """Timed queries (rows of the 8 columns above) and the walltime they span."""

    rows: np.ndarray
    walltime_ms: float
    warmup_queries: int = 0
    warmup_ms: float = 0.0

    @classmethod
    def of(cls, rows: np.ndarray, warmup_ms: float) -> Trace:
        """Drop the warm-up queries the trtexec way: those that started computing early."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 8)
        measured = rows[rows[:, COMPUTE_S] >= warmup_ms]
        if len(measured) == 0:
            raise GdwsError("no timed queries after the warm-up; raise --iterations or --duration")
        walltime = float(measured[-1, D2H_E] - measured[0, H2D_S])
        return cls(measured, walltime, len(rows) - len(measured), warmup_ms)

    @classmethod
    def join(cls, parts: Sequence[Trace]) -> Trace:
        """Traces timed in separate blocks (interleaved comparisons): walltimes, warm-up
        queries and warm-up times add up."""
        return cls(
            np.concatenate([p.rows for p in parts]),
            sum(p.walltime_ms for p in parts),
            sum(p.warmup_queries for p in parts),
            sum(p.warmup_ms for p in parts),
        )

    def durations(self) -> Dict[str, np.ndarray]:
        r = self.rows
        h2d = r[:, H2D_E] - r[:, H2D_S]
        compute = r[:, COMPUTE_E] - r[:, COMPUTE_S]
        d2h = r[:, D2H_E] - r[:, D2H_S]
        return {
            "latency": h2d + compute + d2h,
            "enqueue_time": r[:, ENQ_E] - r[:, ENQ_S],
            "h2d_latency": h2d,
            "gpu_compute_time": compute,
            "d2h_latency": d2h,
        }


@dataclass(frozen=True)
class PerformanceSummary:
    """What trtexec's summary says, as numbers; the same JSON for our runs and parsed logs."""

    throughput_qps: float
    metrics: Dict[str, MetricStats]
    total_host_walltime_s: Optional[float]
    total_gpu_compute_time_s: Optional[float] = None
    batch: Optional[int] = None
    queries: Optional[int] = None
    warmup_queries: Optional[int] = None
    device: str = "gpu"
    source: str = "gdws-deploy"
    tensorrt_version: Optional[str] = None
    warnings: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def images_per_s(self) -> Optional[float]:
        return None if self.batch is None else self.throughput_qps * self.batch

    def lines(self) -> List[str]:
        """The summary block, line by line, as trtexec prints it (plus images/s)."""
        out = ["=== Performance summary ===", f"Throughput: {fmt(self.throughput_qps)} qps"]
        if self.images_per_s is not None:
            out.append(f"Throughput: {fmt(self.images_per_s)} images/s (batch {self.batch})")
        out += [stats.line(METRIC_LABELS[key]) for key, stats in self.metrics.items()]
        if self.total_host_walltime_s is not None:
            out.append(f"Total Host Walltime: {fmt(self.total_host_walltime_s)} s")
        if self.total_gpu_compute_time_s is not None:
            out.append(f"Total GPU Compute Time: {fmt(self.total_gpu_compute_time_s)} s")
        return out + list(self.warnings)

    def as_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "source": self.source,
            "device": self.device,
            "tensorrt_version": self.tensorrt_version,
            "throughput_qps": self.throughput_qps,
            "throughput_images_per_s": self.images_per_s,
            "batch": self.batch,
            "queries": self.queries,
            "warmup_queries": self.warmup_queries,
            "total_host_walltime_s": self.total_host_walltime_s,
            "total_gpu_compute_time_s": self.total_gpu_compute_time_s,
            "warnings": list(self.warnings),
        }
        data.update({key: stats.as_dict() for key, stats in self.metrics.items()})
        return data


def gpu_warnings(metrics: Dict[str, MetricStats], cuda_graph: bool) -> Tuple[str, ...]:
    """trtexec's hints on what bounds throughput, by its thresholds."""
    compute = metrics["gpu_compute_time"]
    notes = []
    if metrics["enqueue_time"].median > ENQUEUE_BOUND_RATIO * compute.median:
        notes.append(
            "* Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may"
            " be under-utilized."
        )
        if not cuda_graph:
            notes.append("  --useCudaGraph (utilize CUDA graphs where possible) may help.")
    for key, way in (("h2d_latency", "host-to-device"), ("d2h_latency", "device-to-host")):
        if metrics[key].median >= compute.median:
            notes.append(
                f"* Throughput may be bound by {way} transfers rather than GPU Compute and the"
                " GPU may be under-utilized. Add --noDataTransfers to disable data transfers."
            )
    if compute.coeff_var is not None and compute.coeff_var > UNSTABLE_COEFF_VAR:
        notes.append(
            "* GPU compute time is unstable, with coefficient of variance = "
            f"{fmt(compute.coeff_var)}%. Lock the clocks (jetson/setup.sh) for stable numbers."
        )
    return tuple(notes)


def summarize(
    trace: Trace,
    batch: int,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    device: str = "gpu",
    cuda_graph: bool = False,
    tensorrt_version: Optional[str] = None,
) -> PerformanceSummary:
    """The summary of a trace; a CPU runner reports only Latency (it has no transfers)."""
    durations = trace.durations()
    keys = list(durations) if device == "gpu" else ["latency"]
    metrics = {key: MetricStats.of(durations[key], percentiles) for key in keys}
    queries = len(trace.rows)
    gpu_total = None
    if device == "gpu":
        gpu_total = metrics["gpu_compute_time"].mean * queries / 1000
    return PerformanceSummary(
        throughput_qps=queries / trace.walltime_ms * 1000 if trace.walltime_ms > 0 else 0.0,
        metrics=metrics,
        total_host_walltime_s=trace.walltime_ms / 1000,
        total_gpu_compute_time_s=gpu_total,
        batch=batch,
        queries=queries,
        warmup_queries=trace.warmup_queries,
        device=device,
        tensorrt_version=tensorrt_version,
        warnings=gpu_warnings(metrics, cuda_graph) if device == "gpu" else (),
    )


def prolog_lines(trace: Trace) -> List[str]:
    """trtexec's lines before the summary; a run without warm-up says so instead."""
    warmup = f"Warmup completed {trace.warmup_queries} queries over {fmt(trace.warmup_ms)} ms"
    return [
        warmup if trace.warmup_ms > 0 else "No warm-up (--warmUp 0)",
        f"Timing trace has {len(trace.rows)} queries over {fmt(trace.walltime_ms / 1000)} s",
    ]


def trace_averages(trace: Trace, runs: int) -> np.ndarray:
    """Means over consecutive groups of `runs` queries: columns latency, compute, enqueue."""
    if runs < 1:
        raise GdwsError(f"--avgRuns must be at least 1, got {runs}")
    d = trace.durations()
    table = np.stack([d["latency"], d["gpu_compute_time"], d["enqueue_time"]], axis=1)
    groups = len(table) // runs
    return table[: groups * runs].reshape(groups, runs, 3).mean(axis=1)


def trace_lines(trace: Trace, runs: int, device: str) -> List[str]:
    """trtexec's "=== Trace details ===" block."""
    out = ["=== Trace details ===", f"Trace averages of {runs} runs:"]
    for latency, compute, enqueue in trace_averages(trace, runs):
        if device == "gpu":
            out.append(
                f"Average on {runs} runs - GPU latency: {fmt(compute)} ms - Host latency: "
                f"{fmt(latency)} ms (enqueue {fmt(enqueue)} ms)"
            )
        else:
            out.append(f"Average on {runs} runs - Latency: {fmt(latency)} ms")
    return out
