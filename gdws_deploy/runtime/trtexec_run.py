"""Run NVIDIA's own trtexec when it is installed and read its summary.

JetPack puts trtexec in /usr/src/tensorrt/bin, which is not on PATH; $TRTEXEC overrides.
The output is passed through line by line as it comes (a build takes minutes on a Jetson)
and parsed at the end into the same summary `gdws-deploy bench` reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.perf_summary import PerformanceSummary
from gdws_deploy.runtime.trtexec_log import parse_trtexec_log

JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


class TrtexecRun(NamedTuple):
    command: List[str]
    log: str
    summary: PerformanceSummary


def find_trtexec(explicit: Optional[str] = None) -> str:
    """$TRTEXEC, then trtexec on PATH, then JetPack's location."""
    for candidate in (explicit, os.environ.get("TRTEXEC"), shutil.which("trtexec")):
        if candidate:
            if not (Path(candidate).is_file() and os.access(candidate, os.X_OK)):
                raise GdwsError(f"trtexec {candidate} is not an executable file")
            return str(candidate)
    if os.access(JETPACK_TRTEXEC, os.X_OK):
        return JETPACK_TRTEXEC
    raise GdwsError(
        f"trtexec not found (not on PATH, not at {JETPACK_TRTEXEC}, $TRTEXEC unset); "
        "it ships with TensorRT/JetPack; `gdws-deploy bench` measures without it"
    )


def run_trtexec(
    arguments: Sequence[str],
    binary: Optional[str] = None,
    echo: Optional[Callable[[str], None]] = None,
) -> TrtexecRun:
    """Run trtexec with `arguments`; a failed run raises its last error line."""
    command = [find_trtexec(binary), *arguments]
    lines: List[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            lines.append(line)
            if echo is not None:
                echo(line.rstrip("\n"))
    log = "".join(lines)
    if process.returncode != 0:
        errors = [line.strip() for line in lines if "[E]" in line or "FAILED" in line]
        reason = errors[-1] if errors else f"exit status {process.returncode}"
        raise GdwsError(f"trtexec failed: {reason}")
    return TrtexecRun(command, log, parse_trtexec_log(log))
