"""Run the real `gdws-deploy` entry point in this process and capture what the user sees."""

from __future__ import annotations

from typing import NamedTuple

from gdws_deploy.cli import main


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(capsys, *args: str) -> CliResult:
    """main(args) with stdout/stderr captured; exit code as the console script returns it."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_one_line_error(result: CliResult, fragment: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    lines = result.err.strip().splitlines()
    assert result.code == 2, result
    assert len(lines) == 1 and lines[0].startswith("gdws-deploy: error: "), result.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err
