"""Device memory, streams, events and CUDA graphs behind one small interface.

pycuda is used where it is installed (the L4T JetPack images have the toolkit it builds
against); cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` before 12) otherwise.
$GDWS_CUDA_LIBRARY=pycuda|cuda-python picks one. Every CUDA failure becomes a GdwsError.
"""

from __future__ import annotations

import abc
import ctypes
import importlib
import importlib.util
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError

LIBRARIES = ("pycuda", "cuda-python")
LIBRARY_ENV = "GDWS_CUDA_LIBRARY"


class CudaLibrary(abc.ABC):
    """What the runtime needs from CUDA, nothing more."""

    name = "cuda"

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> int:
        """Device memory of `nbytes`; returns its address."""

    @abc.abstractmethod
    def free(self, address: int) -> None:
        """Release memory from `alloc`."""

    @abc.abstractmethod
    def pinned(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A page-locked host array, so copies can run asynchronously."""

    @abc.abstractmethod
    def h2d(self, address: int, host: np.ndarray, stream: Any) -> None:
        """Queue a host-to-device copy of `host` on `stream`."""

    @abc.abstractmethod
    def d2h(self, host: np.ndarray, address: int, stream: Any) -> None:
        """Queue a device-to-host copy into `host` on `stream`."""

    @abc.abstractmethod
    def stream(self) -> Any:
        """A new stream."""

    @abc.abstractmethod
    def stream_handle(self, stream: Any) -> int:
        """The raw cudaStream_t TensorRT's execute_async_v3 takes."""

    @abc.abstractmethod
    def synchronize(self, stream: Any) -> None:
        """Wait until `stream` is idle."""

    @abc.abstractmethod
    def event(self) -> Any:
        """A timing event."""

    @abc.abstractmethod
    def record(self, event: Any, stream: Any) -> None:
        """Record `event` on `stream`."""

    @abc.abstractmethod
    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events (waits for `end`)."""

    def capture_graph(self, stream: Any, work: Callable[[], None]) -> Any:
        """Capture `work` (queued on `stream`) into an executable CUDA graph."""
        raise GdwsError(f"--useCudaGraph: {self.name} cannot capture CUDA graphs; use cuda-python")

    def launch_graph(self, graph: Any, stream: Any) -> None:
        raise GdwsError(f"{self.name} cannot launch CUDA graphs")

    @abc.abstractmethod
    def close(self) -> None:
        """Release the library's hold on the device."""


class PycudaLibrary(CudaLibrary):
    """pycuda on the device's primary context (the one TensorRT uses too)."""

    name = "pycuda"

    def __init__(self) -> None:
        self.driver = importlib.import_module("pycuda.driver")
        try:
            self.driver.init()
            if self.driver.Device.count() == 0:
                raise GdwsError("no CUDA device found (pycuda sees 0 devices)")
            self.context = self.driver.Device(0).retain_primary_context()
            self.context.push()
        except self.driver.Error as error:
            raise GdwsError(f"CUDA is not usable: {error}") from error
        self._allocations = {}

    def alloc(self, nbytes: int) -> int:
        allocation = self.driver.mem_alloc(max(int(nbytes), 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, address: int) -> None:
        self._allocations.pop(address).free()

    def pinned(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        return self.driver.pagelocked_empty(tuple(shape), dtype)

    def h2d(self, address: int, host: np.ndarray, stream: Any) -> None:
        self.driver.memcpy_htod_async(address, host, stream)

    def d2h(self, host: np.ndarray, address: int, stream: Any) -> None:
        self.driver.memcpy_dtoh_async(host, address, stream)

    def stream(self) -> Any:
        return self.driver.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def event(self) -> Any:
        return self.driver.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(end.time_since(start))

    def close(self) -> None:
        for allocation in self._allocations.values():
            allocation.free()
        self._allocations.clear()
        self.context.pop()


def _cudart() -> Any:
    try:
        return importlib.import_module("cuda.bindings.runtime")  # cuda-python >= 12
    except ImportError:
        return importlib.import_module("cuda.cudart")  # cuda-python 11.x (JetPack 5)


class CudaPythonLibrary(CudaLibrary):
    """NVIDIA's cuda-python runtime bindings: every call returns (error, results...)."""

    name = "cuda-python"

    def __init__(self) -> None:
        self.rt = _cudart()
        (count,) = self._call("cudaGetDeviceCount")
        if count == 0:
            raise GdwsError("no CUDA device found (cudaGetDeviceCount is 0)")
        self._pinned = {}

    def _call(self, function: str, *args: Any) -> Tuple[Any, ...]:
        error, *results = getattr(self.rt, function)(*args)
        if int(error) != 0:
            _, text = self.rt.cudaGetErrorString(error)
            detail = text.decode() if isinstance(text, bytes) else str(text)
            raise GdwsError(f"CUDA is not usable: {function} failed with {error.name}: {detail}")
        return tuple(results)

    def alloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", max(int(nbytes), 1))[0])

    def free(self, address: int) -> None:
        self._call("cudaFree", address)

    def pinned(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        nbytes = max(size * dtype.itemsize, 1)
        address = int(self._call("cudaMallocHost", nbytes)[0])
        raw = (ctypes.c_byte * nbytes).from_address(address)
        self._pinned[address] = raw
        return np.frombuffer(raw, dtype=dtype, count=size).reshape(tuple(shape))

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> None:
        self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)

    def h2d(self, address: int, host: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._copy(address, host.ctypes.data, host.nbytes, kind, stream)

    def d2h(self, host: np.ndarray, address: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._copy(host.ctypes.data, address, host.nbytes, kind, stream)

    def stream(self) -> Any:
        return self._call("cudaStreamCreate")[0]

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def event(self) -> Any:
        return self._call("cudaEventCreate")[0]

    def record(self, event: Any, stream: Any) -> None:
        self._call("cudaEventRecord", event, stream)

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._call("cudaEventSynchronize", end)
        return float(self._call("cudaEventElapsedTime", start, end)[0])

    def capture_graph(self, stream: Any, work: Callable[[], None]) -> Any:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call("cudaStreamBeginCapture", stream, mode)
        work()
        (graph,) = self._call("cudaStreamEndCapture", stream)
        return self._call("cudaGraphInstantiateWithFlags", graph, 0)[0]

    def launch_graph(self, graph: Any, stream: Any) -> None:
        self._call("cudaGraphLaunch", graph, stream)

    def close(self) -> None:
        for address in list(self._pinned):
            self._call("cudaFreeHost", address)
        self._pinned.clear()


def _installed(library: str) -> bool:
    if library == "pycuda":
        return importlib.util.find_spec("pycuda") is not None
    if importlib.util.find_spec("cuda") is None:
        return False
    return any(importlib.util.find_spec(m) for m in ("cuda.bindings", "cuda.cudart"))


def open_cuda(library: Optional[str] = None) -> CudaLibrary:
    """The CUDA library to use: `library`, else $GDWS_CUDA_LIBRARY, else pycuda, cuda-python."""
    wanted = library or os.environ.get(LIBRARY_ENV) or None
    if wanted is not None and wanted not in LIBRARIES:
        raise GdwsError(f"{LIBRARY_ENV}={wanted!r} is not one of {', '.join(LIBRARIES)}")
    for name in [wanted] if wanted else LIBRARIES:
        if not _installed(name):
            continue
        return PycudaLibrary() if name == "pycuda" else CudaPythonLibrary()
    raise GdwsError(
        f"{wanted or 'no CUDA buffer library'} is not installed: TensorRT inference needs "
        "pycuda (JetPack images) or cuda-python (pip install cuda-python)"
    )
