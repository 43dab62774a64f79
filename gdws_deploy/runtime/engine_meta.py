"""The JSON written next to every engine: who built it, from what, for which shapes.

A TensorRT plan only loads in the exact TensorRT version that built it, and deserializing a
foreign plan fails with a vague log line; the metadata lets the runner say precisely why
before touching the GPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.shapes import Profile
from gdws_deploy.runtime.trt_compat import TrtVersion

PathLike = Union[str, Path]


def metadata_path(plan: PathLike) -> Path:
    return Path(f"{plan}.json")


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def profiles_to_json(profiles: Dict[str, Profile]) -> Dict[str, Dict[str, list]]:
    return {name: {k: list(v) for k, v in p._asdict().items()} for name, p in profiles.items()}


def profiles_from_json(data: Dict[str, Dict[str, list]]) -> Dict[str, Profile]:
    return {
        name: Profile(tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for name, p in data.items()
    }


def read_metadata(plan: PathLike) -> Optional[Dict[str, Any]]:
    """The engine's metadata, or None for an engine built elsewhere (e.g. by trtexec)."""
    path = metadata_path(plan)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GdwsError(f"engine metadata {path} is unreadable: {error}") from error
    if not isinstance(data, dict) or "tensorrt" not in data:
        raise GdwsError(f"engine metadata {path} has no 'tensorrt' entry")
    return data


def built_by(metadata: Dict[str, Any]) -> TrtVersion:
    entry = metadata["tensorrt"]
    return TrtVersion(str(entry.get("flavour", "tensorrt")), str(entry.get("version", "?")))


def check_engine_version(
    plan: PathLike, metadata: Optional[Dict[str, Any]], running: TrtVersion
) -> None:
    """Refuse an engine from another TensorRT flavour or version, naming both."""
    if metadata is None:
        return
    builder = built_by(metadata)
    if builder != running:
        raise GdwsError(
            f"engine {plan} was built by {builder} but this is {running}; engines only load "
            "in the TensorRT that built them: rebuild it here with `gdws-deploy build`"
        )
