"""Tables of the exits verbs: stages, the calibrated policy, the staged benchmark."""

from __future__ import annotations

from typing import Any, Dict

from rich.table import Table

from gdws_deploy.exits.calibrate import Calibration
from gdws_deploy.exits.split import SplitModel
from gdws_deploy.runtime.staged import ExitPolicy
from gdws_deploy.runtime.staged_bench import ExitsBench


def split_table(split: SplitModel) -> Table:
    """One row per stage: file, tensors in and out, own and cumulative MACs."""
    policy = split.policy
    table = Table(
        title=f"stages (single-pass model: {policy.full_macs:,} MACs)", title_justify="left"
    )
    for column in ("stage", "inputs", "outputs", "MACs", "to this exit", "threshold"):
        table.add_column(
            column, justify="right" if "MAC" in column or column == "to this exit" else "left"
        )
    thresholds = policy.thresholds or ()
    for k, stage in enumerate(split.stages):
        threshold = f"{thresholds[k]:.4g}" if k < len(thresholds) else "-"
        table.add_row(
            stage.file,
            ", ".join(stage.inputs),
            ", ".join(stage.outputs),
            f"{stage.macs:,}",
            f"{policy.stage_macs[k]:,} ({policy.stage_macs[k] / policy.full_macs:.2f})",
            threshold,
        )
    return table


def calibration_table(chosen: Calibration, policy: ExitPolicy) -> Table:
    """One row per exit: threshold, share of calibration samples leaving there, MAC share."""
    table = Table(
        title=f"{chosen.scheme} over {chosen.policies} policies: accuracy "
        f"{chosen.accuracy:.1%}, expected MACs {chosen.expected_share:.3f} of the single-pass "
        f"model (budget {policy.budget:g})",
        title_justify="left",
    )
    for column in ("exit", "threshold (nats)", "leave here", "MACs to here"):
        table.add_column(column, justify="left" if column == "exit" else "right")
    for k, name in enumerate(policy.outputs):
        threshold = f"{chosen.thresholds[k]:.4g}" if k < len(chosen.thresholds) else "-"
        table.add_row(
            name,
            threshold,
            f"{chosen.exit_shares[k]:.1%}",
            f"{policy.stage_macs[k] / policy.full_macs:.3f}",
        )
    return table


def bench_table(result: ExitsBench, backend: str) -> Table:
    """The staged and the single-pass model side by side."""
    table = Table(
        title=f"{result.samples} samples, {backend}, batch {result.staged.batch}, interleaved",
        title_justify="left",
    )
    for column in ("model", "exits taken", "MACs (share)", "accuracy", "ms / batch", "images/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    shares = " / ".join(f"{share:.0%}" for share in result.exit_shares)
    for label, summary, exits, macs, accuracy in (
        ("multi-exit", result.staged, shares, result.expected_share, result.staged_accuracy),
        ("single-pass", result.full, "-", 1.0, result.full_accuracy),
    ):
        table.add_row(
            label,
            exits,
            f"{macs:.3f}",
            f"{accuracy:.1%}",
            f"{summary.metrics['latency'].mean:.4g}",
            f"{summary.images_per_s:.4g}",
        )
    return table


def bench_record(result: ExitsBench) -> Dict[str, Any]:
    """The benchmark as JSON."""
    return {
        "samples": result.samples,
        "exit_shares": list(result.exit_shares),
        "expected_macs": result.expected_macs,
        "full_macs": result.full_macs,
        "expected_share": result.expected_share,
        "accuracy": {"multi_exit": result.staged_accuracy, "single_pass": result.full_accuracy},
        "speedup": result.speedup,
        "multi_exit": result.staged.as_dict(),
        "single_pass": result.full.as_dict(),
    }
