"""gdws-deploy: generalized depthwise-separable rewrites of robust CNNs, deployed.

Heavy modules (onnx, torch, tensorrt) are imported lazily so `import gdws_deploy`
stays fast and works on a Jetson with only the runtime installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GdwsError": "gdws_deploy.errors",
    "GdwsFactors": "gdws_deploy.passes.gdws.decompose",
    "ChannelSpectra": "gdws_deploy.passes.gdws.decompose",
    "lego": "gdws_deploy.passes.gdws.decompose",
    "mego": "gdws_deploy.passes.gdws.decompose",
    "convert": "gdws_deploy.pipeline.convert",
    "ConvertOptions": "gdws_deploy.options",
    "load_mirror": "gdws_deploy.robustness.mirror",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gdws_deploy' has no attribute {name!r}")
