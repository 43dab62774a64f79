"""compare's table: one row per model, every method measured the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

from rich.table import Table

if TYPE_CHECKING:
    from gdws_deploy.pipeline.results import CompareResult

COLUMNS = (
    "model",
    "fewer MACs",
    "weights",
    "smaller",
    "images/s",
    "speed-up",
    "clean [95% CI]",
    "robust [95% CI]",
)


def compare_table(result: CompareResult) -> Table:
    """MACs, weight storage, measured speed, clean and robust accuracy with intervals."""
    table = Table(
        title=f"compare on {result.model}: accuracy on {result.check['samples']} samples of "
        f"{result.check['dataset']}, speed on onnxruntime CPU (batch {result.bench.batch}, "
        "interleaved)",
        title_justify="left",
    )
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    original_bits = result.original.size_bits
    for p in result.points:
        table.add_row(
            p.label,
            f"{p.reduction:.2f}x",
            f"{p.size_bits / 8 / 1024:.0f} KiB",
            f"{original_bits / p.size_bits:.1f}x",
            f"{p.images_per_s:.0f}" if p.images_per_s else "-",
            f"{p.speedup:.2f}x" if p.speedup else "-",
            _with_interval(p.clean_acc, p.clean_ci95),
            _with_interval(p.robust_acc, p.robust_ci95),
        )
    return table


def _with_interval(value: float, interval: Tuple[float, float]) -> str:
    low, high = interval
    return f"{value:.1%} [{low:.1%}, {high:.1%}]"
