"""Read trtexec's log (TensorRT 8.x and 10.x) into the same summary our benchmark reports.

Both versions print the same summary lines behind an optional "[date-time] [I] " prefix;
8.5+ prints one `percentile(P%)` per --percentile value, older 8.x one percentile and an
extra "End-to-End Host Latency" line. The version comes from "TensorRT version: X.Y.Z" or
the "[TensorRT v8502]" / "[TensorRT v100300]" tag of the &&&& lines.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Dict, List, Optional

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.perf_summary import METRIC_LABELS, MetricStats, PerformanceSummary

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)"
_PREFIX = re.compile(r"^(?:\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d\]\s*)?(?:\[[VIWEF]\]\s*)?")
_STATS = re.compile(
    r"^(?P<label>[A-Za-z0-9 -]+): min = {n} ms, max = {n} ms, mean = {n} ms, median = {n} ms"
    r"(?P<rest>(?:, percentile\({n}%\) = {n} ms)*)\s*$".replace("{n}", _NUMBER)
)
_PERCENTILE = re.compile(r"percentile\({n}%\) = {n} ms".replace("{n}", _NUMBER))
_THROUGHPUT = re.compile(rf"^Throughput: {_NUMBER} qps\s*$")
_IMAGES = re.compile(rf"^Throughput: {_NUMBER} images/s \(batch (\d+)\)\s*$")
_WALLTIME = re.compile(rf"^Total Host Walltime: {_NUMBER} s\s*$")
_GPU_TOTAL = re.compile(rf"^Total GPU Compute Time: {_NUMBER} s\s*$")
_UNSTABLE = re.compile(rf"coefficient of variance = {_NUMBER}%")
_VERSION_LINE = re.compile(r"^TensorRT version: (\d+(?:\.\d+)+)")
_VERSION_TAG = re.compile(r"\[TensorRT v(\d+)\]")
_BATCH = re.compile(r"^Batch: (\d+|Explicit)\s*$")
_SHAPE = re.compile(r"^Input inference shape\s*:\s*(.+?)=(\d+(?:x\d+)*)\s*$")
_TIMED = re.compile(r"^Timing trace has (\d+) queries")
_WARMUP = re.compile(r"^Warmup completed (\d+) queries")
_LABEL_KEYS = {label: key for key, label in METRIC_LABELS.items()}


def decode_version_tag(number: int) -> str:
    """NV_TENSORRT_VERSION -> 'X.Y.Z': 8502 is 8.5.2 (M*1000+m*100+p), 100300 is 10.3.0."""
    if number >= 10000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def _stats(match: re.Match[str]) -> MetricStats:
    low, high, mean, median = (float(match.group(i)) for i in range(2, 6))
    pairs = tuple((float(p), float(v)) for p, v in _PERCENTILE.findall(match.group("rest")))
    return MetricStats(low, high, mean, median, pairs)


def _version(lines: List[str]) -> Optional[str]:
    for line in lines:
        found = _VERSION_LINE.match(line)
        if found:
            return found.group(1)
    for line in lines:
        tag = _VERSION_TAG.search(line)
        if tag:
            return decode_version_tag(int(tag.group(1)))
    return None


def _batch(lines: List[str]) -> Optional[int]:
    """Images per query: --batch N (implicit batch, qps already counts images) or 1 input's N."""
    ours = _first(_IMAGES, lines)
    if ours:
        return int(ours.group(2))
    shapes = [m.group(2) for m in map(_SHAPE.match, lines) if m]
    for line in lines:
        found = _BATCH.match(line)
        if found and found.group(1) != "Explicit":
            return 1
    if len(shapes) == 1:
        return int(shapes[0].split("x")[0])
    return None


def _first(pattern: re.Pattern[str], lines: List[str]) -> Optional[re.Match[str]]:
    for line in lines:
        found = pattern.search(line)
        if found:
            return found
    return None


def parse_trtexec_log(text: str) -> PerformanceSummary:
    """The performance summary in a trtexec log; GdwsError if it has none."""
    lines = [_PREFIX.sub("", raw.rstrip()) for raw in text.splitlines()]
    try:
        start = lines.index("=== Performance summary ===")
    except ValueError:
        raise GdwsError("no '=== Performance summary ===' in the trtexec output") from None
    block = lines[start + 1 :]
    throughput = _first(_THROUGHPUT, block)
    if throughput is None:
        raise GdwsError("the trtexec summary has no 'Throughput: ... qps' line")
    metrics: Dict[str, MetricStats] = {}
    for line in block:
        found = _STATS.match(line)
        if found and found.group("label") in _LABEL_KEYS:
            metrics[_LABEL_KEYS[found.group("label")]] = _stats(found)
        if line.startswith("Explanations of the performance metrics") or (not line and metrics):
            break
    unstable = _first(_UNSTABLE, block)
    if "gpu_compute_time" in metrics and unstable:
        compute = metrics["gpu_compute_time"]
        metrics["gpu_compute_time"] = replace(compute, coeff_var=float(unstable.group(1)))
    walltime, gpu_total = _first(_WALLTIME, block), _first(_GPU_TOTAL, block)
    timed, warmup = _first(_TIMED, lines), _first(_WARMUP, lines)
    return PerformanceSummary(
        throughput_qps=float(throughput.group(1)),
        metrics=metrics,
        total_host_walltime_s=float(walltime.group(1)) if walltime else None,
        total_gpu_compute_time_s=float(gpu_total.group(1)) if gpu_total else None,
        batch=_batch(lines),
        queries=int(timed.group(1)) if timed else None,
        warmup_queries=int(warmup.group(1)) if warmup else None,
        device="gpu",
        source="trtexec",
        tensorrt_version=_version(lines),
        warnings=tuple(line for line in block if line.startswith("* ")),
    )
