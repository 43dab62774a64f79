"""Time ONNX models on a backend: model bytes and an input shape in, seconds out.

The tuner's one hook into a runtime. A Backend loads a model into a gdws_deploy.runtime
Runner; timing is the runtime's trtexec-style loop, with several models timed in
alternating blocks so that load from other processes hits every candidate alike. A model's
time is the median (or the minimum) of its timed queries, compute only (no host-device
copies).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.benchmark import (
    BenchOptions,
    declared_input,
    interleaved_loops,
    random_input,
    target_for,
)
from gdws_deploy.runtime.providers import CPU, Provider, provider_names
from gdws_deploy.runtime.runner import OrtRunner, Runner

Shape = Tuple[int, ...]
STATISTICS = {"median": np.median, "min": np.min}


@dataclass(frozen=True)
class Timing:
    """How long to time: alternating rounds, at least `queries` and `seconds` per model;
    statistic: median or min of the query times."""

    rounds: int = 4
    queries: int = 12
    seconds: float = 0.2
    warmup_ms: float = 20.0
    statistic: str = "median"


DEFAULT_TIMING = Timing()
# onnxruntime's profiler: the event of a node's compute, and runs left out before counting.
_KERNEL_SUFFIX = "_kernel_time"
_PROFILE_WARMUP = 1
# Profiled runs per block: a model runs a block at a time (after its own warm-up), so its
# runs find their own data in the caches, as in steady use; blocks alternate among models.
_PROFILE_BLOCK = 3


class Backend(abc.ABC):
    """Where models are timed. `name` keys cached measurements: runtime, version, settings."""

    no_data_transfers = False

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Identifies this backend's measurements in a cache file."""

    @abc.abstractmethod
    def runner(self, model: bytes, input_shape: Shape) -> contextlib.AbstractContextManager:
        """An active Runner for `model`, ready for inputs of `input_shape`."""

    def seconds(self, model: bytes, input_shape: Shape, timing: Timing = DEFAULT_TIMING) -> float:
        """Median time of one inference of `model` at `input_shape`."""
        return time_models(self, [(model, input_shape)], timing)[0]

    def node_seconds(
        self, models: Sequence[bytes], input_shape: Shape, runs: int
    ) -> List[Dict[str, float]]:
        """For each model, median seconds per inference of each node the backend runs, by
        its own name for the node (fused and layout nodes included), from its per-node
        profiler."""
        raise GdwsError(f"{type(self).__name__} has no per-node profiler wired in")


class OrtBackend(Backend):
    """onnxruntime with `threads` intra-op threads (0: onnxruntime's default) on
    `providers` (runtime.providers; default: the CPU)."""

    def __init__(self, threads: int = 0, providers: Optional[Sequence[Provider]] = None) -> None:
        if int(threads) != threads or threads < 0:
            raise GdwsError(f"onnxruntime threads must be a whole number >= 0, got {threads}")
        self.threads = int(threads)
        self.providers = list(providers) if providers else [CPU]

    @property
    def name(self) -> str:
        import onnxruntime as ort

        names = provider_names(self.providers)
        where = (
            "cpu" if names == [CPU] else "+".join(n.replace("ExecutionProvider", "") for n in names)
        )
        return f"onnxruntime-{ort.__version__}-{where}-threads{self.threads}"

    @contextlib.contextmanager
    def runner(self, model: bytes, input_shape: Shape) -> Iterator[Runner]:
        with OrtRunner(model, providers=self.providers, threads=self.threads) as runner:
            yield runner

    def node_seconds(
        self, models: Sequence[bytes], input_shape: Shape, runs: int
    ) -> List[Dict[str, float]]:
        """The models run in turn, a block of runs at a time, each profiled and plain, so
        that the drifts of a shared machine (other tenants: 10-25 % here) fall on all
        alike. onnxruntime's profiler costs every node some microseconds, at batch 1 as
        much as a small node itself; the per-run time it adds (profiled against plain) is
        taken off the nodes evenly, so forms with more nodes are not charged for it."""
        batch = random_input(input_shape)
        blocks = -(-runs // _PROFILE_BLOCK)
        with contextlib.ExitStack() as stack:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gdws-profile-")))
            pairs = [
                [
                    stack.enter_context(
                        OrtRunner(
                            model,
                            providers=self.providers,
                            threads=self.threads,
                            profile_prefix=prefix,
                        )
                    )
                    for prefix in (str(folder / f"profile{index}"), None)
                ]
                for index, model in enumerate(models)
            ]
            # seconds[block, model, profiled or plain, run of the block]
            seconds = np.array(
                [
                    [[_block_seconds(runner, batch) for runner in pair] for pair in pairs]
                    for _ in range(blocks)
                ]
            )
            events = [
                json.loads(Path(profiled.session.end_profiling()).read_text())
                for profiled, _ in pairs
            ]
        per_model = seconds.transpose(1, 2, 0, 3).reshape(len(models), 2, -1)
        profiled, plain = np.median(per_model, axis=2).T
        return [
            _node_seconds(model_events, max(extra, 0.0))
            for model_events, extra in zip(events, profiled - plain)
        ]


def _node_seconds(events: Sequence[dict], overhead: float) -> Dict[str, float]:
    """Median seconds of each node over its measured runs in onnxruntime's profile (the
    runs after each block's warm-up), less an even share of the profiler's `overhead` per
    run."""
    times: Dict[str, List[float]] = collections.defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith(_KERNEL_SUFFIX):
            times[name[: -len(_KERNEL_SUFFIX)]].append(event["dur"] * 1e-6)
    share = overhead / max(len(times), 1)
    cycle = _PROFILE_WARMUP + _PROFILE_BLOCK
    medians = {}
    for name, durations in times.items():
        measured = np.arange(len(durations)) % cycle >= _PROFILE_WARMUP
        medians[name] = max(float(np.median(np.array(durations)[measured])) - share, 0.0)
    return medians


def _block_seconds(runner: Runner, batch: np.ndarray) -> List[float]:
    """Seconds of each of _PROFILE_BLOCK inferences after _PROFILE_WARMUP unmeasured ones."""
    seconds = []
    for run in range(_PROFILE_WARMUP + _PROFILE_BLOCK):
        started = time.perf_counter()
        runner.infer(batch)
        if run >= _PROFILE_WARMUP:
            seconds.append(time.perf_counter() - started)
    return seconds


class TrtBackend(Backend):
    """TensorRT on this machine's GPU: each model is built into an engine for exactly
    `input_shape` first (gdws_deploy.runtime's build), then timed on CUDA events."""

    no_data_transfers = True

    def __init__(self, fp16: bool = False) -> None:
        self.fp16 = fp16

    @property
    def name(self) -> str:
        from gdws_deploy.runtime import trt_compat

        version = trt_compat.version_of(trt_compat.load_tensorrt())
        return f"tensorrt-{version}-{'fp16' if self.fp16 else 'fp32'}"

    @contextlib.contextmanager
    def runner(self, model: bytes, input_shape: Shape) -> Iterator[Runner]:
        import onnx

        from gdws_deploy.runtime.engine_build import BuildOptions, build_engine
        from gdws_deploy.runtime.trt_runner import TrtRunner

        name = onnx.load_from_string(model).graph.input[0].name
        options = BuildOptions(fp16=self.fp16, shapes={name: tuple(input_shape)})
        with tempfile.TemporaryDirectory(prefix="gdws-tune-") as folder:
            source, plan = Path(folder) / "model.onnx", Path(folder) / "model.plan"
            source.write_bytes(model)
            build_engine(str(source), str(plan), options, echo=lambda line: None)
            with TrtRunner(plan) as runner:
                yield runner

    def node_seconds(
        self, models: Sequence[bytes], input_shape: Shape, runs: int
    ) -> List[Dict[str, float]]:
        """One engine at a time (GPU kernels time on CUDA events, apart from the host)."""
        batch = random_input(input_shape)
        measured = []
        for model in models:
            with self.runner(model, input_shape) as runner:
                measured.append(runner.layer_seconds(batch, runs))
        return measured


def time_models(
    backend: Backend, models: Sequence[Tuple[bytes, Shape]], timing: Timing = DEFAULT_TIMING
) -> List[float]:
    """Seconds per inference of each (model, input shape), timed interleaved in one process."""
    options = BenchOptions(
        warmup_ms=timing.warmup_ms,
        iterations=timing.queries,
        duration_s=timing.seconds,
        no_data_transfers=backend.no_data_transfers,
    )
    with contextlib.ExitStack() as stack:
        targets = []
        for model, shape in models:
            runner = stack.enter_context(backend.runner(model, shape))
            targets.append(target_for(runner, options, {declared_input(runner)[0]: tuple(shape)}))
        traces = interleaved_loops(targets, options, timing.rounds)
    statistic = STATISTICS[timing.statistic]
    return [float(statistic(trace.durations()["gpu_compute_time"])) / 1000 for trace in traces]


@dataclass(frozen=True)
class BackendEntry:
    """What one backend name means: a timing Backend (speed/, from --tune) and a verdict
    Runner (robustness/evaluate.py, from --backend), so both speak of the same runtimes.

    timing(threads, providers): the Backend (onnxruntime's threads, None for its default,
    and execution providers, None for the CPU);
    runner: "module:Class" of the Runner, imported only when chosen (TensorRT need not be
    installed); loads: the file that runner takes, the ONNX "model" or a built "engine".
    """

    timing: Callable[[Optional[int], Optional[Sequence[Provider]]], Backend]
    runner: str
    loads: str
    threaded: bool = False


BACKENDS: Dict[str, BackendEntry] = {
    "ort": BackendEntry(
        lambda threads, providers: OrtBackend(threads or 0, providers),
        "gdws_deploy.runtime.runner:OrtRunner",
        "model",
        threaded=True,
    ),
    "trt": BackendEntry(
        lambda threads, providers: TrtBackend(),
        "gdws_deploy.runtime.trt_runner:TrtRunner",
        "engine",
    ),
}


def backend_named(
    name: Optional[str],
    threads: Optional[int] = None,
    providers: Optional[Sequence[Provider]] = None,
) -> Optional[Backend]:
    """The timing backend `--tune NAME` means (None for none); threads and providers
    (runtime.providers.ort_providers) only for onnxruntime."""
    if name is None:
        if threads is not None:
            raise GdwsError("--tune-threads needs --tune ort")
        return None
    entry = BACKENDS.get(name)
    if entry is not None and entry.threaded:
        return entry.timing(threads, providers)
    threaded = " or ".join(key for key, known in BACKENDS.items() if known.threaded)
    if threads is not None:
        raise GdwsError(f"--tune-threads applies to --tune {threaded}, not --tune {name}")
    if entry is None:
        raise GdwsError(f"tune backend must be {' or '.join(BACKENDS)}, got {name!r}")
    return entry.timing(threads, None)
