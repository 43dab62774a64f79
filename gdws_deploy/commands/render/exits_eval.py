"""`exits eval`'s table: per attack, robust accuracy, exits taken and the compute forced."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from gdws_deploy.robustness.exit_attacks import ExitEvalReport


def exits_eval_table(report: ExitEvalReport) -> Table:
    """Clean inputs, each attack's, and the worst case per sample over the attacks."""
    thresholds = ", ".join(f"{t:.4g}" for t in report.thresholds)
    table = Table(
        title=f"{report.model} on {report.samples} samples ({report.dataset}), staged "
        f"runtime, thresholds {thresholds} nats; MACs as a share of the single-pass model",
        title_justify="left",
    )
    for column in ("inputs", "accuracy [95% CI]", "exits taken", "expected MACs", "disagree"):
        table.add_column(column, justify="left" if column == "inputs" else "right")
    for outcome in (report.clean, *report.attacks, report.worst):
        low, high = outcome.ci95
        table.add_row(
            outcome.name,
            f"{outcome.accuracy:.1%} [{low:.1%} - {high:.1%}]",
            " / ".join(f"{share:.0%}" for share in outcome.exit_shares) or "-",
            f"{outcome.expected_share:.3f}"
            + (" (per-sample max)" if outcome is report.worst else ""),
            str(outcome.disagreements),
        )
    return table
