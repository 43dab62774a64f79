"""The consoles verbs print on."""

from __future__ import annotations

from rich.console import Console

# Width of output that is not a terminal (logs, pipes): table rows stay on one line.
WIDE_OUTPUT = 160


def stdout_console() -> Console:
    """stdout; at least WIDE_OUTPUT columns where it is not a terminal, so layer names and
    sweep points are never wrapped in logs."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, WIDE_OUTPUT)
    return console
