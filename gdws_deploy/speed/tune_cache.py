"""Measured layer times, kept in memory and optionally in a JSON file between runs.

Keys name the backend, the batch, the layer's shape and the candidate form, so one file
serves many models: every layer of the same shape reuses a measurement. The file is
written atomically; one that cannot be read is an error, never silently replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.errors import GdwsError

FORMAT = "gdws-deploy tune cache"
VERSION = 1


class TuneCache:
    """Seconds by key; `save()` writes the file (if any) when something new was measured."""

    def __init__(self, path: Optional[Union[str, Path]] = None) -> None:
        self.path = None if path is None else Path(path)
        self.seconds: Dict[str, float] = {}
        self.changed = False
        if self.path is not None:
            check_output_path(self.path)
            if self.path.exists():
                self.seconds = _read(self.path)

    def get(self, key: str) -> Optional[float]:
        return self.seconds.get(key)

    def put(self, key: str, seconds: float) -> None:
        self.seconds[key] = float(seconds)
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        record = {
            "format": FORMAT,
            "version": VERSION,
            "seconds": dict(sorted(self.seconds.items())),
        }
        try:
            with atomic_open(self.path) as handle:
                json.dump(record, handle, indent=1)
        except OSError as error:
            raise GdwsError(f"cannot write {self.path}: {error.strerror or error}") from error
        self.changed = False


def _read(path: Path) -> Dict[str, float]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GdwsError(f"cannot read tune cache {path}: {error}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise GdwsError(f"{path} is not a gdws-deploy tune cache")
    if record.get("version") != VERSION:
        raise GdwsError(
            f"{path} is a tune cache of version {record.get('version')}, expected {VERSION}"
        )
    seconds = record.get("seconds")
    if not isinstance(seconds, dict) or not all(
        isinstance(v, (int, float)) and v > 0 for v in seconds.values()
    ):
        raise GdwsError(f"{path}: 'seconds' must map keys to positive numbers")
    return {str(key): float(value) for key, value in seconds.items()}
