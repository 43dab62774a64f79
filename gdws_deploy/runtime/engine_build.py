"""ONNX -> TensorRT engine, with the knobs trtexec has, and a metadata JSON beside it.

Steps, each failing with one GdwsError line: check options, parse with TensorRT's ONNX parser,
resolve the optimization profile, configure precision/DLA/workspace/timing cache/calibrator,
`build_serialized_network`, write the plan and its metadata atomically.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from gdws_deploy import __version__
from gdws_deploy.atomic import atomic_open, atomic_path, check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime import trt_compat
from gdws_deploy.runtime.calibration import (
    CalibrationFeed,
    make_entropy_calibrator,
    read_cache,
)
from gdws_deploy.runtime.engine_meta import metadata_path, profiles_to_json, sha256_file
from gdws_deploy.runtime.shapes import Profile, Shape, is_dynamic, resolve_profiles
from gdws_deploy.runtime.trt_compat import ParserIssue, TrtVersion

Echo = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass(frozen=True)
class BuildOptions:
    """trtexec's build flags, under the names `gdws-deploy build` uses."""

    fp16: bool = False
    int8: bool = False
    calibration_cache: Optional[str] = None
    calibration_batches: Optional[int] = None
    dla_core: Optional[int] = None
    allow_gpu_fallback: bool = False
    workspace_mib: Optional[int] = None
    timing_cache: Optional[str] = None
    shapes: Dict[str, Shape] = field(default_factory=dict)
    min_shapes: Dict[str, Shape] = field(default_factory=dict)
    opt_shapes: Dict[str, Shape] = field(default_factory=dict)
    max_shapes: Dict[str, Shape] = field(default_factory=dict)
    batch: int = 1
    verbose: bool = False

    @property
    def precision(self) -> str:
        names = [name for name, on in (("int8", self.int8), ("fp16", self.fp16)) if on]
        return "+".join(names) or "fp32"

    def validate(self) -> None:
        """Refuse combinations TensorRT would reject late or silently ignore."""
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise GdwsError(f"--workspace must be a positive MiB count, got {self.workspace_mib}")
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise GdwsError(f"--dla-core must be 0 or more, got {self.dla_core}")
            if not (self.fp16 or self.int8):
                raise GdwsError("--dla-core needs --fp16 or --int8: the DLA has no FP32 mode")
        elif self.allow_gpu_fallback:
            raise GdwsError("--allow-gpu-fallback only applies together with --dla-core")
        if self.calibration_batches is not None and not self.int8:
            raise GdwsError("--calib-batches only applies together with --int8")


class ParseReport(NamedTuple):
    tensorrt: TrtVersion
    inputs: Dict[str, Shape]
    outputs: Dict[str, Shape]
    layers: int
    issues: List[ParserIssue]


class BuildReport(NamedTuple):
    plan: Path
    metadata: Path
    tensorrt: TrtVersion
    precision: str
    profiles: Dict[str, Profile]
    gpu_layers: List[str]
    calibration_batches: int
    plan_bytes: int
    seconds: float


class _Network:
    """Builder, network, parser and logger kept together (TensorRT needs them alive)."""

    def __init__(self, onnx_path: Path, verbose: bool, echo: Echo) -> None:
        if not onnx_path.is_file():
            raise GdwsError(f"cannot read {onnx_path}: no such file")
        self.trt = trt_compat.load_tensorrt()
        self.logger = trt_compat.make_logger(self.trt, verbose, echo)
        try:
            self.builder = self.trt.Builder(self.logger)
        except (TypeError, RuntimeError) as error:
            why = self._why(error)
            raise GdwsError(f"{self.version} cannot create a builder: {why}") from error
        self.network = self.builder.create_network(trt_compat.network_flags(self.trt))
        self.parser = self.trt.OnnxParser(self.network, self.logger)
        self.parsed = bool(self.parser.parse_from_file(str(onnx_path)))
        why = trt_compat.unreadable_model(self.trt, self.parser)
        if why is None and self.parsed and self.network.num_outputs == 0:
            why = "it reads as a model without outputs"  # what any text file decodes to
        if why is not None:
            raise GdwsError(f"{onnx_path} is not a valid ONNX model (TensorRT's parser: {why})")

    @property
    def version(self) -> TrtVersion:
        return trt_compat.version_of(self.trt)

    def _why(self, fallback: object) -> str:
        return self.logger.errors[-1] if self.logger.errors else str(fallback)

    def tensors(self, count: int, get: Callable[[int], Any]) -> Dict[str, Shape]:
        return {get(i).name: tuple(get(i).shape) for i in range(count)}

    def inputs(self) -> Dict[str, Shape]:
        return self.tensors(self.network.num_inputs, self.network.get_input)

    def outputs(self) -> Dict[str, Shape]:
        return self.tensors(self.network.num_outputs, self.network.get_output)

    def layers(self) -> List[Any]:
        return [self.network.get_layer(i) for i in range(self.network.num_layers)]


def parse_onnx(
    onnx_path: str,
    nodes: Sequence[Tuple[int, str, str]] = (),
    verbose: bool = False,
    echo: Echo = _stderr,
) -> ParseReport:
    """Run TensorRT's ONNX parser only (`build --parse-only`).

    The parser stops at the first node it cannot import; `nodes` (index, name, op type),
    when the caller can read the ONNX graph, adds every node whose op has no importer.
    """
    net = _Network(Path(onnx_path), verbose, echo)
    issues = trt_compat.parser_issues(net.parser)
    seen = {issue.node for issue in issues}
    for index, name, op in nodes:
        if index not in seen and not net.parser.supports_operator(op):
            issues.append(ParserIssue(index, name, op, f"TensorRT has no importer for {op}"))
    issues.sort(key=lambda issue: issue.node)
    layers = net.network.num_layers if net.parsed else 0
    return ParseReport(net.version, net.inputs(), net.outputs(), layers, issues)


def _add_profile(net: _Network, config: Any, options: BuildOptions) -> Dict[str, Profile]:
    profiles = resolve_profiles(
        net.inputs(),
        options.shapes,
        options.min_shapes,
        options.opt_shapes,
        options.max_shapes,
        options.batch,
    )
    if any(is_dynamic(shape) for shape in net.inputs().values()):
        profile = net.builder.create_optimization_profile()
        for name, (low, opt, high) in profiles.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        if options.int8 and hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(profile)
    return profiles


def _check_dla_core(net: _Network, options: BuildOptions) -> None:
    cores = net.builder.num_DLA_cores
    if options.dla_core >= cores:
        raise GdwsError(
            f"--dla-core {options.dla_core}: this builder sees {cores} DLA core(s) "
            "(a Jetson AGX Xavier has 2: 0 and 1)"
        )


def _configure_dla(net: _Network, config: Any, options: BuildOptions) -> List[str]:
    """Put the network on a DLA core; return the layers that must run on the GPU."""
    config.default_device_type = trt_compat.dla_device(net.trt)
    config.DLA_core = options.dla_core
    gpu_layers = [layer.name for layer in net.layers() if not config.can_run_on_DLA(layer)]
    if gpu_layers and not options.allow_gpu_fallback:
        shown = ", ".join(gpu_layers[:5]) + (", ..." if len(gpu_layers) > 5 else "")
        raise GdwsError(
            f"the DLA cannot run {len(gpu_layers)} layer(s) ({shown}); "
            "add --allow-gpu-fallback to run them on the GPU"
        )
    if options.allow_gpu_fallback:
        config.set_flag(trt_compat.builder_flag(net.trt, "GPU_FALLBACK", "--allow-gpu-fallback"))
    return gpu_layers


def _load_timing_cache(net: _Network, config: Any, path: str) -> Any:
    data = Path(path).read_bytes() if Path(path).exists() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        raise GdwsError(
            f"--timing-cache {path} was written by another TensorRT version or GPU; "
            "delete it or choose another file"
        )
    return cache


def _configure(net: _Network, options: BuildOptions) -> Tuple[Any, List[str]]:
    """The builder config and, on a DLA, the layers falling back to the GPU."""
    if options.dla_core is not None:
        _check_dla_core(net, options)
    config = net.builder.create_builder_config()
    if options.workspace_mib is not None:
        trt_compat.set_workspace(net.trt, config, options.workspace_mib)
    if options.fp16:
        config.set_flag(trt_compat.builder_flag(net.trt, "FP16", "--fp16"))
    if options.int8:
        config.set_flag(trt_compat.builder_flag(net.trt, "INT8", "--int8"))
    gpu_layers = _configure_dla(net, config, options) if options.dla_core is not None else []
    return config, gpu_layers


def _calibrator(
    net: _Network,
    config: Any,
    options: BuildOptions,
    profiles: Dict[str, Profile],
    batches: Optional[Iterable[Any]],
) -> Tuple[Any, Optional[CalibrationFeed], Any]:
    """Attach an entropy calibrator; returns it, its feed and the CUDA library it holds."""
    if len(profiles) != 1:
        raise GdwsError("--int8 calibration supports models with exactly one input")
    from gdws_deploy.runtime.cuda_buffers import open_cuda

    (profile,) = profiles.values()
    feed = CalibrationFeed(batches or (), profile.opt, options.calibration_batches)
    cuda = open_cuda()
    calibrator = make_entropy_calibrator(net.trt, feed, options.calibration_cache, cuda)
    config.int8_calibrator = calibrator
    return calibrator, feed, cuda


def _metadata(
    net: _Network,
    onnx_path: Path,
    options: BuildOptions,
    profiles: Dict[str, Profile],
    gpu_layers: List[str],
    served: int,
) -> Dict[str, Any]:
    return {
        "format": "gdws-deploy-engine/1",
        "tensorrt": {"flavour": net.version.flavour, "version": net.version.version},
        "precision": options.precision,
        "source": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "inputs": {name: list(shape) for name, shape in net.inputs().items()},
        "outputs": {name: list(shape) for name, shape in net.outputs().items()},
        "profiles": profiles_to_json(profiles),
        "dla": {
            "core": options.dla_core,
            "gpu_fallback": options.allow_gpu_fallback,
            "gpu_layers": gpu_layers,
        },
        "workspace_mib": options.workspace_mib,
        "calibration": {"batches": served, "cache": options.calibration_cache}
        if options.int8
        else None,
        "built_with": f"gdws-deploy {__version__}",
    }


def build_engine(
    onnx_path: str,
    plan_path: str,
    options: BuildOptions = BuildOptions(),
    calibration: Optional[Iterable[Any]] = None,
    echo: Echo = _stderr,
) -> BuildReport:
    """Build `plan_path` from `onnx_path`; `calibration` is any iterable of input batches."""
    options.validate()
    if options.int8 and calibration is None and read_cache(options.calibration_cache) is None:
        raise GdwsError("--int8 needs --calib DATASET or an existing --calib-cache file")
    source, plan = Path(onnx_path), Path(plan_path)
    check_output_path(plan, source)
    check_output_path(metadata_path(plan), source)
    started = time.perf_counter()
    net = _Network(source, options.verbose, echo)
    if not net.parsed:
        issues = trt_compat.parser_issues(net.parser)
        first = str(issues[0]) if issues else net._why("unknown parser error")
        more = f" (+{len(issues) - 1} more)" if len(issues) > 1 else ""
        raise GdwsError(f"TensorRT's ONNX parser rejects {source}: {first}{more}")
    config, gpu_layers = _configure(net, options)
    profiles = _add_profile(net, config, options)
    cache = _load_timing_cache(net, config, options.timing_cache) if options.timing_cache else None
    calibrator, feed, cuda = (
        _calibrator(net, config, options, profiles, calibration) if options.int8 else (None,) * 3
    )
    try:
        serialized = net.builder.build_serialized_network(net.network, config)
        if calibrator is not None and calibrator.error is not None:
            error = calibrator.error
            raise error if isinstance(error, GdwsError) else GdwsError(f"calibration: {error}")
    finally:
        if calibrator is not None:
            calibrator.close()
            cuda.close()
    if serialized is None:
        raise GdwsError(f"{net.version} could not build {source}: {net._why('no reason given')}")
    served = feed.served if feed is not None else 0
    metadata = _metadata(net, source, options, profiles, gpu_layers, served)
    with atomic_path(plan) as tmp_plan, atomic_open(metadata_path(plan)) as meta:
        tmp_plan.write_bytes(bytes(serialized))
        json.dump(metadata, meta, indent=2)
    if cache is not None:
        with atomic_open(options.timing_cache, "wb") as handle:
            handle.write(bytes(config.get_timing_cache().serialize()))
    return BuildReport(
        plan,
        metadata_path(plan),
        net.version,
        options.precision,
        profiles,
        gpu_layers,
        served,
        plan.stat().st_size,
        time.perf_counter() - started,
    )
