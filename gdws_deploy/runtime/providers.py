"""Where models run: a --device spec, and the onnxruntime execution providers it means.

Pure Python (no torch, no onnxruntime at import), so the device side (bench, Python 3.8)
and the host (eval, --tune ort) choose providers by one rule: on a CUDA device, TensorRT's
provider when this onnxruntime has it, then CUDA's, with the CPU last for the ops neither
takes; on the CPU, the CPU. `--providers` names them outright instead.

onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: with both in one
environment whichever was installed last wins, file by file. `installed_onnxruntime`
refuses that state in one line rather than let it fail somewhere inside a session.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from gdws_deploy.errors import GdwsError

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# --providers accepts these short names as well as onnxruntime's own.
PROVIDER_NAMES = {"cpu": CPU, "cuda": CUDA, "trt": TENSORRT, "tensorrt": TENSORRT}
INSTALL_HINT = (
    "pip install gdws-deploy[cpu], or gdws-deploy[gpu] on a CUDA machine (never both: "
    "onnxruntime and onnxruntime-gpu must not share an environment)"
)
# Default batches on a GPU, as multiples of the CPU's: attacks there are throughput-bound
# and PreActResNet-18's PGD at 4x eval's 128 (512 CIFAR images) fits in well under 8 GB.
GPU_BATCH_SCALE = 4
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
# A provider as InferenceSession takes it: a name, or (name, options).
Provider = Union[str, Tuple[str, Dict[str, Any]]]


def parse_device(text: str, flag: str = "--device") -> Tuple[str, Optional[int]]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (kind, index); the index only for cuda:N."""
    match = _DEVICE.match(str(text).strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise GdwsError(f"{flag} must be auto, cpu, cuda or cuda:N, got {text!r}")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def parse_providers(text: Optional[str], flag: str = "--providers") -> Optional[List[str]]:
    """'trt,cuda,cpu' (or onnxruntime's names) -> onnxruntime's names, in order; None: choose."""
    if text is None or not str(text).strip():
        return None
    known = {name.lower(): name for name in (CPU, CUDA, TENSORRT)}
    chosen = []
    for part in (piece.strip() for piece in str(text).split(",") if piece.strip()):
        name = PROVIDER_NAMES.get(part.lower()) or known.get(part.lower())
        if name is None:
            short = ", ".join(PROVIDER_NAMES)
            raise GdwsError(
                f"{flag}: unknown provider {part!r} (use {short} or onnxruntime's name)"
            )
        if name not in chosen:
            chosen.append(name)
    return chosen


def choose_providers(
    kind: str,
    index: Optional[int],
    available: Sequence[str],
    requested: Optional[Sequence[str]] = None,
) -> List[Provider]:
    """The providers an InferenceSession gets on device (kind, index), from the ones this
    onnxruntime has (`available`). `requested` (parse_providers) is taken as given, each
    one checked; otherwise a CUDA device uses TensorRT's and CUDA's providers where present,
    and the CPU's always comes last (it takes what the others leave)."""
    if requested:
        missing = [name for name in requested if name not in available]
        if missing:
            raise GdwsError(
                f"this onnxruntime has no {missing[0]} (it has {', '.join(available)}); "
                f"{INSTALL_HINT}"
            )
        names = list(requested)
    elif kind == "cuda":
        names = [name for name in (TENSORRT, CUDA) if name in available] + [CPU]
    else:
        names = [CPU]
    options = {} if index is None else {"device_id": index}
    return [(name, dict(options)) if name != CPU and options else name for name in names]


def provider_names(providers: Sequence[Provider]) -> List[str]:
    """The names of `providers`, without their options."""
    return [provider if isinstance(provider, str) else provider[0] for provider in providers]


def installed_onnxruntime() -> Any:
    """The onnxruntime module; a GdwsError when it is missing or when both onnxruntime and
    onnxruntime-gpu are installed (each overwrote the other's files)."""
    from importlib import metadata

    present = []
    for distribution in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        present.append(distribution)
    if len(present) > 1:
        raise GdwsError(
            "onnxruntime and onnxruntime-gpu are both installed and overwrite each other's "
            f"files: pip uninstall -y onnxruntime onnxruntime-gpu, then {INSTALL_HINT}"
        )
    try:
        import onnxruntime
    except ImportError:
        raise GdwsError(f"onnxruntime is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def ort_providers(device: str = "cpu", requested: Optional[Sequence[str]] = None) -> List[Provider]:
    """choose_providers for a --device spec, from what the installed onnxruntime has.
    'auto' is CUDA when this onnxruntime has its CUDA provider (no torch asked here)."""
    kind, index = parse_device(device)
    available = list(installed_onnxruntime().get_available_providers())
    if kind == "auto":
        kind = "cuda" if CUDA in available else "cpu"
    return choose_providers(kind, index, available, requested)
