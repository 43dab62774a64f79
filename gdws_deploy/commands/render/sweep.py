"""sweep's table of points and summary, the table of a --max-robust-drop search (printed
by sweep and by convert), and convert's table of the rules a calibrated target tried."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List

from rich.table import Table

if TYPE_CHECKING:
    from gdws_deploy.pipeline.operating_point import OperatingPoint
    from gdws_deploy.pipeline.results import SweepResult
    from gdws_deploy.pipeline.rule_choice import RuleChoice


def sweep_table(result: SweepResult) -> Table:
    """One row per model: MACs, parameters, clean and robust accuracy, speed."""
    table = Table(
        title=f"sweep of {result.model} ({result.allocation}), robust accuracy on "
        f"{result.check['samples']} samples of {result.check['dataset']}",
        title_justify="left",
    )
    for column in (
        "point",
        "MACs",
        "fewer MACs",
        "params",
        "clean",
        "robust [95% CI]",
        "images/s",
        "speed-up",
    ):
        table.add_column(column, justify="left" if column == "point" else "right")
    for p in result.points:
        low, high = p.robust_ci95
        table.add_row(
            p.label,
            f"{p.macs / 1e6:.2f}M",
            f"{p.reduction:.2f}x",
            f"{p.parameters / 1e3:.1f}k",
            f"{p.clean_acc:.1%}",
            f"{p.robust_acc:.1%} [{low:.1%}, {high:.1%}]",
            f"{p.images_per_s:.0f}" if p.images_per_s else "-",
            f"{p.speedup:.2f}x" if p.speedup else "-",
        )
    return table


def search_table(point: OperatingPoint) -> Table:
    """Every probe of a --max-robust-drop search, in the order run."""
    table = Table(
        title=f"search: fastest conversion losing <= {point.max_drop:.1%} robust and "
        f"<= {point.max_clean_drop:.1%} clean accuracy (original {point.robust_acc:.1%} robust, "
        f"{point.clean_acc:.1%} clean on {point.check['samples']} samples of "
        f"{point.check['dataset']})",
        title_justify="left",
    )
    table.add_column("rule")
    table.add_column("family")
    columns = ("target", "fewer MACs", "speed-up", "clean", "robust", "drop", "clean drop")
    for column in (*columns, "verdict"):
        table.add_column(column, justify="right")
    for probe in point.probes:
        if probe.reduction is None:
            table.add_row(
                probe.rule or "-", probe.knob, f"{probe.target:g}x", *["-"] * 6, probe.note
            )
            continue
        reached = (
            probe.rule or "-",
            probe.knob,
            f"{probe.target:g}x",
            f"{probe.reduction:.2f}x",
            "-" if probe.speedup is None else f"{probe.speedup:.2f}x",
        )
        if probe.drop is None:
            table.add_row(*reached, *["-"] * 4, probe.note)
            continue
        verdict = "within" if probe.within else "beyond"
        if probe == point.best:
            verdict = "[bold green]chosen[/]"
        table.add_row(
            *reached,
            f"{probe.clean_acc:.1%}",
            f"{probe.robust_acc:.1%}",
            f"{probe.drop:+.1%}",
            f"{probe.clean_drop:+.1%}",
            verdict,
        )
    return table


def rule_table(choice: RuleChoice) -> Table:
    """Every rule a calibrated MAC target was converted under, as judged; the kept one
    marked."""
    table = Table(
        title=f"allocation rules at {choice.target}, judged on {choice.samples} samples of "
        f"{choice.dataset}: relative is kept unless another rule is significantly more "
        "robust (paired, 95 %)",
        title_justify="left",
    )
    table.add_column("rule")
    for column in ("fewer MACs", "speed-up", "clean", "robust", "robust gain (SE)", "verdict"):
        table.add_column(column, justify="right")
    for score in choice.scores:
        table.add_row(
            score.rule,
            f"{score.reduction:.2f}x",
            "-" if score.speedup is None else f"{score.speedup:.2f}x",
            f"{score.clean_acc:.1%}",
            f"{score.robust_acc:.1%}",
            "-" if score is choice.scores[0] else f"{score.robust_z:+.1f}",
            "[bold green]chosen[/]" if score.rule == choice.chosen else "",
        )
    return table


def sweep_summary(result: SweepResult, out: Path) -> List[str]:
    """The chosen point (if searched) and where the plot, report and models went."""
    lines = []
    best = result.operating_point and result.operating_point.best
    if result.operating_point is not None and best is None:
        lines.append("no conversion keeps the robust drop within the limit: keep the original")
    chosen = [p for p in result.points if p.kind == "max-drop"]
    for point in chosen:
        lines.append(
            f"max robust drop {result.operating_point.max_drop:.1%}: {point.reduction:.2f}x fewer "
            f"MACs, {point.speedup:.2f}x the original's images/s, robust "
            f"{point.robust_acc:.1%} vs {result.original.robust_acc:.1%} on the eval data"
        )
    lines.append(f"plot: {out / 'sweep.png'}")
    lines.append(f"report: {out / 'sweep.json'}")
    models = ", ".join(Path(p.model).name for p in result.points if p.kind != "original")
    lines.append(f"converted models in {out}: {models}")
    return lines
