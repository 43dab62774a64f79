"""The torch device the mirror, the attacks, alphas and loss curves run on.

A --device spec (gdws_deploy.runtime.providers.parse_device) becomes a torch.device here:
'auto' is the first CUDA GPU when torch sees one, else the CPU; 'cuda[:N]' where torch sees
none (a CPU-only torch build, no driver, N past the last GPU) is a one-line GdwsError, not
a failure deep inside the first attack. The verdicts' onnxruntime providers follow the same
device, so a run on the GPU is judged on the GPU.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.providers import (
    GPU_BATCH_SCALE,
    Provider,
    choose_providers,
    installed_onnxruntime,
    parse_device,
)


def resolve_device(spec: str = "auto", flag: str = "--device") -> torch.device:
    """The torch.device a --device spec means on this machine."""
    kind, index = parse_device(spec, flag)
    if kind == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if kind == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise GdwsError(
            f"{flag} {spec}: torch {torch.__version__} ({build}) sees no CUDA GPU; "
            "use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise GdwsError(f"{flag} {spec}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", 0 if index is None else index)


def default_batch(device: torch.device, cpu_batch: int) -> int:
    """A verb's batch when --batch-size is not given: its CPU default, scaled on a GPU."""
    return cpu_batch * GPU_BATCH_SCALE if device.type == "cuda" else cpu_batch


def verdict_providers(
    device: torch.device, requested: Optional[Sequence[str]] = None
) -> List[Provider]:
    """onnxruntime's providers for verdicts on `device` (see choose_providers)."""
    available = list(installed_onnxruntime().get_available_providers())
    return choose_providers(device.type, device.index, available, requested)
