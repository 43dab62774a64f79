"""The one place that knows how TensorRT 8.5, 10.x and TensorRT-RTX differ.

Everything else in the runtime talks to TensorRT through the portable subset (the builder,
`build_serialized_network`, the name-based tensor API and `execute_async_v3`) and asks this
module whenever a flavour or version matters: which Python module to import, the network
creation flags, precision flags and the INT8 calibrator base, parser error details.
"""

from __future__ import annotations

import importlib
import os
import re
from types import ModuleType
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError

# Python module names of the TensorRT flavours, in the order they are tried.
FLAVOURS = ("tensorrt", "tensorrt_rtx")
FLAVOUR_ENV = "GDWS_TENSORRT"


class TrtVersion(NamedTuple):
    """Which TensorRT built or runs an engine: an engine only loads in the same one."""

    flavour: str
    version: str

    def __str__(self) -> str:
        name = "TensorRT-RTX" if self.flavour == "tensorrt_rtx" else "TensorRT"
        return f"{name} {self.version}"


def load_tensorrt(flavour: Optional[str] = None) -> ModuleType:
    """Import TensorRT: `flavour`, else $GDWS_TENSORRT, else the first of FLAVOURS installed.

    Full TensorRT comes first because that is what runs on the Jetson; TensorRT-RTX
    (pip install tensorrt-rtx-cu12) lets a machine without a GPU parse and build ahead of time.
    """
    wanted = flavour or os.environ.get(FLAVOUR_ENV) or None
    if wanted is not None and wanted not in FLAVOURS:
        raise GdwsError(f"{FLAVOUR_ENV}={wanted!r} is not one of {', '.join(FLAVOURS)}")
    for name in [wanted] if wanted else FLAVOURS:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise GdwsError(
        "TensorRT is not installed: the Python module 'tensorrt' comes with JetPack on a "
        "Jetson; elsewhere `pip install tensorrt-rtx-cu12` can parse and build (no GPU needed)"
    )


def version_of(trt: ModuleType) -> TrtVersion:
    return TrtVersion(trt.__name__.split(".")[0], str(trt.__version__))


def version_tuple(version: str) -> Tuple[int, ...]:
    """'8.5.2.2' -> (8, 5, 2, 2); trailing non-numeric parts ('10.0.0b6') are cut."""
    numbers = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def explicit_batch_flags(version: Tuple[int, ...], explicit_batch_bit: Optional[int]) -> int:
    """Network creation flags: 8.x needs EXPLICIT_BATCH set; 10.x and RTX are explicit only."""
    if explicit_batch_bit is None or (version and version[0] >= 10):
        return 0
    return 1 << explicit_batch_bit


def network_flags(trt: ModuleType) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    bit = None if flag is None else int(flag)
    if trt.__name__.startswith("tensorrt_rtx"):
        return 0
    return explicit_batch_flags(version_tuple(trt.__version__), bit)


def set_workspace(trt: ModuleType, config: Any, mebibytes: int) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(mebibytes) << 20)


def builder_flag(trt: ModuleType, name: str, option: str) -> Any:
    """A BuilderFlag by name, or a GdwsError naming the flag `option` the user gave."""
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise GdwsError(
            f"{option}: {version_of(trt)} has no {name} builder flag "
            "(TensorRT-RTX builds strongly typed networks); use TensorRT 8.5/10 on the device"
        )
    return flag


def entropy_calibrator_base(trt: ModuleType) -> type:
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise GdwsError(f"--int8: {version_of(trt)} has no INT8 entropy calibrator")
    return base


def dla_device(trt: ModuleType) -> Any:
    return trt.DeviceType.DLA


def make_logger(trt: ModuleType, verbose: bool, echo: Callable[[str], None]) -> Any:
    """A TensorRT logger that keeps errors for a one-line message and echoes only if verbose.

    TensorRT's own logger prints several lines per parse error; the CLI promises one line.
    """

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: List[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(" ".join(str(msg).split()))
            if verbose:
                echo(f"[TRT] [{str(severity).rsplit('.', 1)[-1]}] {msg}")

    return CollectingLogger()


class ParserIssue(NamedTuple):
    """One node the ONNX parser refused: index in the graph, name and op where known."""

    node: int
    name: str
    operator: str
    message: str

    def __str__(self) -> str:
        where = f"node {self.node}"
        if self.name:
            where += f" {self.name}"
        if self.operator:
            where += f" ({self.operator})"
        return f"{where}: {self.message}"


def parser_issues(parser: Any) -> List[ParserIssue]:
    """The parser's errors; node_name/node_operator exist from TensorRT 10 on only."""
    issues = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        name = error.node_name() if hasattr(error, "node_name") else ""
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        issues.append(
            ParserIssue(int(error.node()), name, operator, " ".join(error.desc().split()))
        )
    return issues


def unreadable_model(trt: ModuleType, parser: Any) -> Optional[str]:
    """The parser's complaint when the file is no ONNX protobuf at all, else None."""
    code = getattr(getattr(trt, "ErrorCode", None), "MODEL_DESERIALIZE_FAILED", None)
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        if code is not None and error.code() == code:
            return " ".join(error.desc().split())
    return None


class TensorInfo(NamedTuple):
    name: str
    is_input: bool
    shape: Tuple[int, ...]
    dtype: np.dtype


def io_tensors(trt: ModuleType, engine: Any) -> List[TensorInfo]:
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        tensors.append(
            TensorInfo(
                name,
                engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                tuple(engine.get_tensor_shape(name)),
                np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
            )
        )
    return tensors


def profile_shapes(engine: Any, name: str, profile: int = 0) -> Tuple[Tuple[int, ...], ...]:
    """(min, opt, max) of an input in an optimization profile (name-based since 8.5)."""
    return tuple(tuple(dims) for dims in engine.get_tensor_profile_shape(name, profile))
