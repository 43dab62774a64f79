"""trtexec's timing loop for any runner, alone or two interleaved for a fair comparison.

A target answers one query at a time with the eight timestamps of a trace row (see
perf_summary). The TensorRT runner times its queries with CUDA events; any other runner is
timed on the host with perf_counter. The loop is trtexec's: it runs until at least
`iterations` queries after the warm-up were timed *and* `warmUp + duration` has passed.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.perf_summary import (
    COMPUTE_S,
    DEFAULT_PERCENTILES,
    PerformanceSummary,
    Trace,
    summarize,
)
from gdws_deploy.runtime.runner import OrtRunner, Runner
from gdws_deploy.runtime.shapes import Shape, format_shape, inference_shape


@dataclass(frozen=True)
class BenchOptions:
    """trtexec's inference flags with its defaults."""

    warmup_ms: float = 200.0
    iterations: int = 10
    duration_s: float = 3.0
    avg_runs: int = 10
    percentiles: Tuple[float, ...] = DEFAULT_PERCENTILES
    batch: Optional[int] = None
    use_cuda_graph: bool = False
    no_data_transfers: bool = False

    def validate(self) -> None:
        checks = (
            (self.warmup_ms >= 0, f"--warmUp must be >= 0 ms, got {self.warmup_ms}"),
            (self.iterations >= 1, f"--iterations must be >= 1, got {self.iterations}"),
            (self.duration_s >= 0, f"--duration must be >= 0 s, got {self.duration_s}"),
            (self.avg_runs >= 1, f"--avgRuns must be >= 1, got {self.avg_runs}"),
            (self.batch is None or self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
        )
        for ok, message in checks:
            if not ok:
                raise GdwsError(message)


class TimedTarget(abc.ABC):
    """Something that answers one query and says when each phase ran (ms since start())."""

    device = "cpu"
    tensorrt_version: Optional[str] = None
    batch: np.ndarray

    @abc.abstractmethod
    def start(self) -> None:
        """Set time zero."""

    @abc.abstractmethod
    def query(self) -> Sequence[float]:
        """Run one query; return the 8 trace columns in ms since start()."""


class HostTimedTarget(TimedTarget):
    """A runner timed with perf_counter around `infer`: no transfers, no enqueue split."""

    def __init__(self, runner: Runner, batch: np.ndarray) -> None:
        self.runner = runner
        self.batch = batch
        self.origin = time.perf_counter()

    def start(self) -> None:
        self.origin = time.perf_counter()

    def query(self) -> Sequence[float]:
        begin = time.perf_counter()
        self.runner.infer(self.batch)
        end = time.perf_counter()
        t0, t1 = (begin - self.origin) * 1000, (end - self.origin) * 1000
        return (t0, t1, t0, t0, t0, t1, t1, t1)


def timing_loop(target: TimedTarget, options: BenchOptions) -> Trace:
    """trtexec's inferenceLoop: queries until iterations (after warm-up) and time are done."""
    target.start()
    stop_ms = options.duration_s * 1000 + options.warmup_ms
    rows: List[Sequence[float]] = []
    skipped = elapsed = 0
    while len(rows) < options.iterations + skipped or elapsed < stop_ms:
        row = target.query()
        rows.append(row)
        elapsed = row[COMPUTE_S]
        if 0 < elapsed < options.warmup_ms:
            skipped += 1
    return Trace.of(np.asarray(rows), options.warmup_ms)


def warm_up(target: TimedTarget, milliseconds: float) -> int:
    """Queries until `milliseconds` have passed (none for 0); returns how many ran."""
    target.start()
    queries, elapsed = 0, 0.0
    while elapsed < milliseconds:
        elapsed = target.query()[COMPUTE_S]
        queries += 1
    return queries


def interleaved_loops(
    targets: Sequence[TimedTarget], options: BenchOptions, rounds: int
) -> List[Trace]:
    """Time several targets in alternating blocks (A B B A ...) so drift hits all alike.

    Each block is a trtexec loop of duration/rounds and iterations/rounds after its own
    warm-up: the block before it was another model's, whose data left this one's caches
    (and whose threads took the cores) -- without it, models with many small ops were
    measured up to 1.4x slower than alone. A target's walltime is the sum of its blocks', and
    so are its warm-up queries and time.
    """
    if rounds < 1:
        raise GdwsError(f"--rounds must be at least 1, got {rounds}")
    block = replace(
        options,
        warmup_ms=0.0,
        iterations=math.ceil(options.iterations / rounds),
        duration_s=options.duration_s / rounds,
    )
    parts: List[List[Trace]] = [[] for _ in targets]
    order = list(range(len(targets)))
    for round_index in range(rounds):
        for index in order if round_index % 2 == 0 else order[::-1]:
            warmed = warm_up(targets[index], options.warmup_ms)
            trace = timing_loop(targets[index], block)
            parts[index].append(replace(trace, warmup_queries=warmed, warmup_ms=options.warmup_ms))
    return [Trace.join(p) for p in parts]


def declared_input(runner: Runner) -> Tuple[str, Shape]:
    """The runner's (only) input: its name and declared shape, -1 on dynamic axes."""
    if isinstance(runner, OrtRunner):
        meta = runner.session.get_inputs()
        if len(meta) != 1:
            raise GdwsError(f"benchmarking needs a model with one input, this one has {len(meta)}")
        return meta[0].name, tuple(d if isinstance(d, int) and d > 0 else -1 for d in meta[0].shape)
    return runner.input_name, tuple(runner.declared_shape)


def random_input(shape: Shape, seed: int = 0) -> np.ndarray:
    """Uniform in [-1, 1], like trtexec's random input data."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=shape).astype(np.float32)


def target_for(runner: Runner, options: BenchOptions, shapes: Mapping[str, Shape]) -> TimedTarget:
    """The timed target for an active runner: CUDA events for TensorRT, the host clock else."""
    name, declared = declared_input(runner)
    batch = random_input(inference_shape(name, declared, options.batch, shapes))
    make_gpu_target = getattr(runner, "timed_target", None)
    if make_gpu_target is not None:
        return make_gpu_target(batch, options)
    if options.use_cuda_graph or options.no_data_transfers:
        raise GdwsError(
            f"--useCudaGraph and --noDataTransfers need the TensorRT backend, not {runner.name}"
        )
    return HostTimedTarget(runner, batch)


class BenchResult(NamedTuple):
    summary: PerformanceSummary
    trace: Trace
    input_shape: Shape


def _result(target: TimedTarget, trace: Trace, options: BenchOptions) -> BenchResult:
    summary = summarize(
        trace,
        int(target.batch.shape[0]) if target.batch.ndim else 1,
        options.percentiles,
        target.device,
        options.use_cuda_graph,
        target.tensorrt_version,
    )
    return BenchResult(summary, trace, tuple(target.batch.shape))


def benchmark(runner: Runner, options: BenchOptions, shapes: Mapping[str, Shape]) -> BenchResult:
    """Time one active runner the trtexec way."""
    options.validate()
    target = target_for(runner, options, shapes)
    return _result(target, timing_loop(target, options), options)


def benchmark_pair(
    runners: Sequence[Runner], options: BenchOptions, shapes: Mapping[str, Shape], rounds: int
) -> List[BenchResult]:
    """Time two (or more) active runners interleaved in this process."""
    options.validate()
    targets = [target_for(runner, options, shapes) for runner in runners]
    traces = interleaved_loops(targets, options, rounds)
    return [_result(t, trace, options) for t, trace in zip(targets, traces)]


def throughput_ratio(base: PerformanceSummary, other: PerformanceSummary) -> float:
    """How many times more images per second `other` answers than `base`."""
    rate = base.images_per_s or base.throughput_qps
    return (other.images_per_s or other.throughput_qps) / rate if rate else math.inf


def input_mismatch(names: Sequence[str], results: Sequence[BenchResult]) -> Optional[str]:
    """A warning when compared models were timed on different images (batch aside: the
    ratio is per image), so their throughput ratio is no speed-up; None when they agree."""
    shapes = [result.input_shape for result in results]
    if len({shape[1:] for shape in shapes}) <= 1:
        return None
    listed = " vs ".join(f"{name} {format_shape(shape)}" for name, shape in zip(names, shapes))
    return f"Warning: inputs differ: {listed}: the ratio compares different work"


def as_json(result: BenchResult, model: str, backend: str, options: BenchOptions) -> dict:
    data = {"model": model, "backend": backend, "options": asdict(options)}
    data["input_shape"] = list(result.input_shape)
    data.update(result.summary.as_dict())
    return data
