"""Atomic file output: a reader sees the old file or the whole new one, never half.

Runs on the Jetson too, so it stays Python 3.8 and standard library only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Sequence, Union

from gdws_deploy.errors import GdwsError

PathLike = Union[str, "os.PathLike[str]"]


def check_output_path(output: PathLike, *inputs: PathLike) -> Path:
    """Refuse to overwrite an input and fail early on an unwritable directory."""
    out = Path(output)
    for source in inputs:
        if Path(source).exists() and out.exists() and out.resolve() == Path(source).resolve():
            raise GdwsError(f"output {out} is the input file; choose another path")
    if out.is_dir():  # else found only when the finished file cannot replace it
        raise GdwsError(f"output {out} is a folder; give a file path")
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise GdwsError(f"output directory {folder} is a file, not a folder")
    if not folder.is_dir():
        raise GdwsError(f"output directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise GdwsError(f"output directory {folder} is not writable")
    return out


@contextlib.contextmanager
def atomic_path(output: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `output`; move it into place only on success.

    Any exception removes the temporary file, Ctrl-C included, and SIGTERM/SIGHUP under the
    CLI (it turns them into exceptions). Only SIGKILL, which no process can catch, can leave
    a hidden `.NAME.XXXXXXXX.tmp` beside `output`; `output` itself is never half-written.
    """
    out = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    try:
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(output: PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a file for writing that appears at `output` only when closed without error."""
    with atomic_path(output) as tmp, open(tmp, mode) as handle:
        yield handle


def check_output_folder(output: PathLike, files: Sequence[PathLike], *inputs: PathLike) -> Path:
    """Refuse early a folder output that cannot be written, or whose `files` (what will
    be written into it) would overwrite an input."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise GdwsError(f"--out {out} exists and is not a folder")
    if not out.exists():
        parent = existing_parent(out)
        if not os.access(parent, os.W_OK):
            raise GdwsError(f"cannot create --out {out}: {parent} is not writable")
        return out
    if not os.access(out, os.W_OK):
        raise GdwsError(f"--out {out} is not writable")
    for path in files:
        check_output_path(path, *inputs)
    return out


def existing_parent(out: PathLike) -> Path:
    """The nearest folder above `out` that exists (a staging folder goes there)."""
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GdwsError(f"cannot create {out}: {parent} is not a folder")
    return parent


@contextlib.contextmanager
def atomic_folder(output: PathLike) -> Iterator[Path]:
    """Yield a hidden sibling folder whose files become `output` only when the block succeeds.

    A new `output` appears in one rename; into an existing folder each file is moved with
    os.replace (each file whole; files already there stay). On failure the staging folder
    is removed, so nothing is left behind.
    """
    out = Path(output)
    stage = existing_parent(out) / f".{out.name}.partial-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            for item in stage.iterdir():
                os.replace(item, out / item.name)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.rename(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _current_umask() -> int:
    """The process umask (mkstemp creates 0600 files; outputs should look ordinary)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
