"""TensorRT engines behind the Runner interface, and their CUDA-event-timed benchmark target.

Buffers are allocated once for the profile's largest shape, so any batch the engine accepts
runs without reallocating; a smaller batch uses the front of each buffer. Before the GPU is
touched the engine's metadata is checked against the running TensorRT.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime import trt_compat
from gdws_deploy.runtime.benchmark import BenchOptions, TimedTarget
from gdws_deploy.runtime.cuda_buffers import open_cuda
from gdws_deploy.runtime.engine_meta import check_engine_version, read_metadata
from gdws_deploy.runtime.runner import Runner
from gdws_deploy.runtime.shapes import Profile, check_in_profile, is_dynamic


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


class TrtRunner(Runner):
    """A serialized TensorRT engine (.plan) with one input; infer returns the first output."""

    name = "trt"

    def __init__(
        self, engine: Union[str, Path], cuda_library: Optional[str] = None, verbose: bool = False
    ) -> None:
        self.engine_path = Path(engine)
        self.cuda_library = cuda_library
        self.verbose = verbose
        self.context = None

    def activate(self) -> None:
        trt = trt_compat.load_tensorrt()
        self.version = trt_compat.version_of(trt)
        if not self.engine_path.is_file():
            raise GdwsError(f"cannot read engine {self.engine_path}: no such file")
        check_engine_version(self.engine_path, read_metadata(self.engine_path), self.version)
        plan = self.engine_path.read_bytes()
        self.cuda = open_cuda(self.cuda_library)
        try:
            self._load(trt, plan)
        except BaseException:
            self.cuda.close()
            raise

    def _load(self, trt: Any, plan: bytes) -> None:
        """Deserialize, find the I/O tensors and the profile, allocate every buffer."""
        self.logger = trt_compat.make_logger(trt, self.verbose, _stderr)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            why = self.logger.errors[-1] if self.logger.errors else "no reason given"
            raise GdwsError(
                f"{self.version} cannot load engine {self.engine_path} (built by another "
                f"TensorRT or for another GPU?): {why}"
            )
        tensors = trt_compat.io_tensors(trt, self.engine)
        inputs = [t for t in tensors if t.is_input]
        if len(inputs) != 1:
            raise GdwsError(f"engine {self.engine_path} has {len(inputs)} inputs; one is supported")
        self.input = inputs[0]
        self.outputs = [t for t in tensors if not t.is_input]
        self.input_name, self.declared_shape = self.input.name, self.input.shape
        if is_dynamic(self.input.shape):
            self.profile = Profile(*trt_compat.profile_shapes(self.engine, self.input.name))
        else:
            self.profile = Profile(self.input.shape, self.input.shape, self.input.shape)
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        self._allocate()

    def _allocate(self) -> None:
        """Device and pinned host buffers for the largest shape of every I/O tensor."""
        self.context.set_input_shape(self.input.name, self.profile.max)
        self.device: Dict[str, int] = {}
        self.host: Dict[str, np.ndarray] = {}
        for tensor in [self.input, *self.outputs]:
            shape = tuple(self.context.get_tensor_shape(tensor.name))
            self.host[tensor.name] = self.cuda.pinned(shape, tensor.dtype)
            self.device[tensor.name] = self.cuda.alloc(self.host[tensor.name].nbytes)
            self.context.set_tensor_address(tensor.name, self.device[tensor.name])

    def bind(self, shape: Sequence[int]) -> Tuple[np.ndarray, List[np.ndarray]]:
        """Set the input shape; return host views (input, outputs) sized for it."""
        if self.context is None:
            raise GdwsError("runner used before activate()")
        check_in_profile(self.input.name, shape, self.profile)
        self.context.set_input_shape(self.input.name, tuple(shape))
        views = []
        for tensor in [self.input, *self.outputs]:
            now = tuple(self.context.get_tensor_shape(tensor.name))
            size = int(np.prod(now, dtype=np.int64))
            views.append(self.host[tensor.name].reshape(-1)[:size].reshape(now))
        return views[0], views[1:]

    def copy_in(self, view: np.ndarray) -> None:
        self.cuda.h2d(self.device[self.input.name], view, self.stream)

    def copy_out(self, views: List[np.ndarray]) -> None:
        for tensor, view in zip(self.outputs, views):
            self.cuda.d2h(view, self.device[tensor.name], self.stream)

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle(self.stream)):
            why = self.logger.errors[-1] if self.logger.errors else "no reason given"
            raise GdwsError(f"TensorRT failed to run {self.engine_path}: {why}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        source, outputs = self.bind(batch.shape)
        source[...] = batch
        self.copy_in(source)
        self.execute()
        self.copy_out(outputs)
        self.cuda.synchronize(self.stream)
        return np.array(outputs[0], dtype=np.float32)

    def layer_seconds(self, batch: np.ndarray, runs: int) -> Dict[str, float]:
        """Median seconds per inference of each engine layer by TensorRT's IProfiler, named
        as TensorRT names them (fused layers 'a + b', pointwise fusions 'PWN(a, b)')."""
        trt = trt_compat.load_tensorrt()
        times = collections.defaultdict(list)  # type: Dict[str, List[float]]

        class Collector(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                times[layer_name].append(ms / 1000.0)

        self.infer(batch)  # warm-up, unprofiled
        self.context.profiler = Collector()
        for _ in range(runs):
            self.infer(batch)
        return {name: float(np.median(seconds)) for name, seconds in times.items()}

    def timed_target(self, batch: np.ndarray, options: BenchOptions) -> TimedTarget:
        return TrtTimedTarget(self, batch, options)

    def deactivate(self) -> None:
        if self.context is None:
            return
        self.cuda.synchronize(self.stream)
        for address in self.device.values():
            self.cuda.free(address)
        self.context = self.engine = self.runtime = None
        self.cuda.close()


class TrtTimedTarget(TimedTarget):
    """One query = H2D, enqueue, D2H on one stream, each phase between two CUDA events.

    As trtexec: --noDataTransfers copies the input once up front and times compute only;
    --useCudaGraph captures the enqueue into a CUDA graph once and launches that.
    """

    device = "gpu"

    def __init__(self, runner: TrtRunner, batch: np.ndarray, options: BenchOptions) -> None:
        self.runner, self.cuda, self.batch = runner, runner.cuda, batch
        self.tensorrt_version = str(runner.version)
        self.transfers = not options.no_data_transfers
        self.source, self.outputs = runner.bind(batch.shape)
        self.source[...] = batch
        runner.copy_in(self.source)
        runner.execute()
        self.cuda.synchronize(runner.stream)
        self.graph: Any = None
        if options.use_cuda_graph:
            self.graph = self.cuda.capture_graph(runner.stream, runner.execute)
        self.events = [self.cuda.event() for _ in range(7)]
        self.cpu_origin = time.perf_counter()

    def start(self) -> None:
        self.cuda.record(self.events[0], self.runner.stream)
        self.cpu_origin = time.perf_counter()

    def _enqueue(self) -> None:
        if self.graph is not None:
            self.cuda.launch_graph(self.graph, self.runner.stream)
        else:
            self.runner.execute()

    def query(self) -> Sequence[float]:
        stream, record = self.runner.stream, self.cuda.record
        origin, h2d_s, h2d_e, c_s, c_e, d2h_s, d2h_e = self.events
        record(h2d_s, stream)
        if self.transfers:
            self.runner.copy_in(self.source)
        record(h2d_e, stream)
        record(c_s, stream)
        enqueue_start = time.perf_counter()
        self._enqueue()
        enqueue_end = time.perf_counter()
        record(c_e, stream)
        record(d2h_s, stream)
        if self.transfers:
            self.runner.copy_out(self.outputs)
        record(d2h_e, stream)
        gpu = [self.cuda.elapsed_ms(origin, event) for event in self.events[1:]]
        cpu = [(t - self.cpu_origin) * 1000 for t in (enqueue_start, enqueue_end)]
        return cpu + gpu
