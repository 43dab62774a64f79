"""SIGTERM and SIGHUP during an atomic write: the temporary file goes, the exit says why.

A real `gdws-deploy` process (its `main`) runs a verb that opens an output with atomic_open,
writes half of it, says so on stdout and waits; the test then signals it. The verb is
registered in the child process only, beside the real ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from gdws_deploy.cli import STOP_SIGNALS, stop_signals_unwind

SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    import click
    from gdws_deploy import cli
    from gdws_deploy.atomic import atomic_open

    @click.command("slow-write")
    @click.argument("output")
    def slow_write(output):
        with atomic_open(output) as handle:
            handle.write("half of the output\\n")
            handle.flush()
            print("writing", flush=True)
            time.sleep(60)

    cli.VERBS["slow-write"] = "__main__:slow_write"
    sys.exit(cli.main(["slow-write", sys.argv[1]]))
    """
)


def default_hangups() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def interrupted_write(folder, signum: int) -> subprocess.CompletedProcess:
    """Run the slow writer, signal it once it is mid-write, and collect how it ended."""
    command = [sys.executable, "-c", SLOW_WRITER, str(folder / "model.onnx")]
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_hangups,  # a run under nohup would hand its SIG_IGN down
    )
    try:
        assert child.stdout.readline() == "writing\n", child.stderr.read()
        assert any(name.endswith(".tmp") for name in os.listdir(folder))
        child.send_signal(signum)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    return subprocess.CompletedProcess(command, child.returncode, out, err)


@pytest.mark.parametrize(
    ("signum", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")]
)
def test_stop_signal_mid_write_removes_the_temporary_file(tmp_path, signum, code, name):
    done = interrupted_write(tmp_path, signum)
    assert done.returncode == code, done.stderr
    assert done.stderr == f"gdws-deploy: terminated ({name})\n"
    assert os.listdir(tmp_path) == []


def test_sighup_ignored_by_nohup_stays_ignored(tmp_path):
    def ignore_hangups() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(tmp_path / "model.onnx")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_hangups,
    )
    try:
        assert child.stdout.readline() == "writing\n"
        child.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 143
    finally:
        child.kill()
        child.communicate()
    assert os.listdir(tmp_path) == []


def test_previous_handlers_come_back_after_the_run():
    def mine(signum, frame):
        """A caller's own handler (never called here)."""

    before = {number: signal.signal(number, mine) for number in STOP_SIGNALS}
    try:
        with stop_signals_unwind():
            assert all(signal.getsignal(n) is not mine for n in STOP_SIGNALS)
        assert all(signal.getsignal(n) is mine for n in STOP_SIGNALS)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
