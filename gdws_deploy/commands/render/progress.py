"""Transient progress on stderr terminals: bars over samples and over factored layers."""

from __future__ import annotations

from typing import Callable, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Below this many eligible layers the factoring is too quick for a progress bar.
PROGRESS_MIN_LAYERS = 8


class BatchProgress:
    """A transient progress bar over samples, on stderr terminals only: samples done (by
    every worker of a sharded run) and the time left at the rate so far."""

    def __init__(self, label: str) -> None:
        self.console = Console(stderr=True)
        self.label = label
        self.bar: Optional[Progress] = None

    def __enter__(self) -> Callable[[int, int], None]:
        return self.update

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, done: int, total: int) -> None:
        if not self.console.is_terminal:
            return
        if self.bar is None:
            columns = (
                TextColumn(self.label),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.bar = Progress(*columns, console=self.console, transient=True)
            self.bar.add_task("", total=total)
            self.bar.start()
        self.bar.update(self.bar.task_ids[0], completed=done)


class LayerProgress:
    """What the conversion is doing (loading, factoring, rewriting, parity, saving) and a
    bar over factored layers when there are many; on terminals only, gone when done."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: Optional[Progress] = None

    def __enter__(self) -> LayerProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def stage(self, text: str) -> None:
        """A step starts; its length is unknown. Drawn at once: steps are few."""
        if self.console.is_terminal:
            self._update(description=text, total=None, completed=0, count="")
            self.bar.refresh()

    def __call__(self, done: int, total: int, name: str) -> None:
        if total >= PROGRESS_MIN_LAYERS and self.console.is_terminal:
            description = f"factoring {name}"
            count = f"{done}/{total}"
            self._update(description=description, total=total, completed=done, count=count)

    def _update(self, description: str, **fields: object) -> None:
        if self.bar is None:
            columns = (
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[count]}"),
            )
            self.bar = Progress(*columns, console=self.console, transient=True)
            self.bar.add_task(description, **fields)
            self.bar.start()
        self.bar.update(self.bar.task_ids[0], description=description, **fields)
