"""INT8 calibration: batches of real inputs for TensorRT's entropy calibrator, and its cache.

The feed takes any iterable of numpy arrays (a dataset's batches, a generator, a list) and
regroups them into exactly the batch shape the calibration profile expects, so it can be
tested alone. The calibrator itself subclasses TensorRT's class, created on demand because
TensorRT is imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from gdws_deploy.atomic import atomic_open
from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.shapes import format_shape
from gdws_deploy.runtime.trt_compat import entropy_calibrator_base


class CalibrationFeed:
    """Float32 batches of exactly `shape`, at most `max_batches` of them.

    Incoming arrays may hold any number of samples (N, *shape[1:]); a single sample
    (*shape[1:]) counts as one. Samples are regrouped across arrays; a last partial batch is
    dropped (TensorRT needs full batches) and counted in `dropped_samples`.
    """

    def __init__(
        self, batches: Iterable[Any], shape: Sequence[int], max_batches: Optional[int] = None
    ) -> None:
        if max_batches is not None and max_batches < 1:
            raise GdwsError(f"--calib-batches must be at least 1, got {max_batches}")
        self.batches = batches
        self.shape = tuple(int(d) for d in shape)
        self.max_batches = max_batches
        self.served = 0
        self.dropped_samples = 0

    def _samples(self, item: Any) -> np.ndarray:
        array = np.asarray(item[0] if isinstance(item, tuple) else item)
        if array.dtype.kind not in "fiub":
            raise GdwsError(f"calibration data of dtype {array.dtype} is not numeric")
        sample = self.shape[1:]
        if array.shape == sample:
            array = array[None]
        if array.shape[1:] != sample:
            raise GdwsError(
                f"calibration batch of shape {format_shape(array.shape)} does not fit the "
                f"model input {format_shape(self.shape)}"
            )
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise GdwsError("calibration data contains NaN or infinite values")
        return array

    def __iter__(self) -> Iterator[np.ndarray]:
        size = self.shape[0]
        pending: List[np.ndarray] = []
        held = 0
        for item in self.batches:
            samples = self._samples(item)
            pending.append(samples)
            held += len(samples)
            if held < size:
                continue
            stacked = np.concatenate(pending) if len(pending) > 1 else samples
            full = held // size
            if self.max_batches is not None:
                full = min(full, self.max_batches - self.served)
            for index in range(full):
                self.served += 1
                yield np.ascontiguousarray(stacked[index * size : (index + 1) * size])
            rest = stacked[full * size :]
            pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
            if self.max_batches is not None and self.served >= self.max_batches:
                self.dropped_samples += held
                return
        self.dropped_samples += held


def read_cache(path: Optional[Union[str, Path]]) -> Optional[bytes]:
    """The calibration cache's bytes, or None when there is none yet (TensorRT calibrates)."""
    if path is None or not Path(path).exists():
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise GdwsError(f"cannot read calibration cache {path}: {error.strerror}") from error
    return data or None


def write_cache(path: Optional[Union[str, Path]], cache: Any) -> None:
    if path is not None:
        with atomic_open(path, "wb") as handle:
            handle.write(bytes(cache))


def make_entropy_calibrator(
    trt: ModuleType,
    feed: CalibrationFeed,
    cache_path: Optional[Union[str, Path]],
    cuda: Any,
) -> Any:
    """An IInt8EntropyCalibrator2 fed by `feed` through one device buffer.

    TensorRT calls get_batch from C++, where a Python exception would be lost: the first
    error is kept in `.error` and the build re-raises it.
    """

    base = entropy_calibrator_base(trt)

    class EntropyCalibrator(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.error: Optional[BaseException] = None
            self._batches = iter(feed)
            self._nbytes = int(np.prod(feed.shape)) * 4
            self._device = cuda.alloc(self._nbytes)
            self._host = cuda.pinned(feed.shape, np.float32)
            self._stream = cuda.stream()

        def get_batch_size(self) -> int:
            return feed.shape[0]

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            try:
                self._host[...] = next(self._batches)
                cuda.h2d(self._device, self._host, self._stream)
                cuda.synchronize(self._stream)
            except StopIteration:
                return None
            except Exception as error:  # surfaced by the build, see class docstring
                self.error = error
                return None
            return [self._device]

        def read_calibration_cache(self) -> Optional[bytes]:
            return read_cache(cache_path)

        def write_calibration_cache(self, cache: Any) -> None:
            write_cache(cache_path, cache)

        def close(self) -> None:
            cuda.free(self._device)

    return EntropyCalibrator()
