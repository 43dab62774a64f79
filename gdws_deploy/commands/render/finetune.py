"""finetune's report table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from gdws_deploy.robustness.finetune import FinetuneReport

# The loss and accuracy rows compare the mean of the first and of the last tenth of steps.
WINDOW_SHARE = 0.1


def report_table(report: FinetuneReport) -> Table:
    """What was trained, on what, under which attack, and how loss and batch accuracy
    moved from the first steps to the last."""
    options = report.options
    table = Table(title=Text(f"fine-tune of {report.model}"), title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        "trained",
        f"{len(report.tensors)} tensors, {report.entries} values ({report.zeros} held at zero)",
    )
    data = f"{options.steps} steps x {options.batch_size} samples of {report.dataset}"
    table.add_row("data", Text(data))  # Text: a spec like photos:train is no emoji code
    attack = options.attack
    if attack is None:
        table.add_row("attack", "none (clean training)")
    else:
        table.add_row(
            "attack",
            f"pgd {attack.norm} eps {attack.eps:.4g}, {attack.steps} steps of "
            f"{attack.step_size:.4g}; clean share {options.clean_share:g}",
        )
    table.add_row(
        "optimizer",
        f"SGD lr {options.lr:g} (cosine), momentum {options.momentum:g}, "
        f"weight decay {options.weight_decay:g}",
    )
    if report.losses:
        table.add_row("loss, first -> last steps", _first_last(report.losses, "{:.4f}"))
        table.add_row("batch accuracy, first -> last", _first_last(report.accuracies, "{:.1%}"))
    table.add_row("time", f"{report.seconds:.1f} s")
    return table


def _first_last(values: Sequence[float], style: str) -> str:
    window = max(1, round(len(values) * WINDOW_SHARE))
    first = sum(values[:window]) / window
    last = sum(values[-window:]) / window
    return f"{style.format(first)} -> {style.format(last)}"
