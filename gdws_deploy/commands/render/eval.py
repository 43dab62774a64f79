"""eval's report table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Sequence

from rich.table import Table

if TYPE_CHECKING:
    from gdws_deploy.robustness.evaluate import EvalReport


def report_table(report: EvalReport) -> Table:
    """Clean and robust accuracy on the backend, the mirror's, and the attacks run, each
    with the robust accuracy of the worst case so far (as AutoAttack prints it)."""
    table = Table(title=f"robustness of {report.model} on {report.backend}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("samples", f"{report.samples} ({report.dataset})")
    table.add_row("clean accuracy", f"{report.clean_acc:.2%}")
    table.add_row("robust accuracy", _with_interval(report.robust_acc, report.robust_ci95))
    table.add_row(
        "mirror clean / robust accuracy",
        f"{report.mirror_clean_acc:.2%} / {report.mirror_robust_acc:.2%}",
    )
    table.add_row(
        "mirror vs backend disagreements",
        f"{report.disagreements_clean} clean, {report.disagreements_adv} adversarial",
    )
    survived = {row["name"]: row for row in report.per_attack}
    for attack in report.attacks:
        table.add_row(f"attack {attack['name']}", _settings(attack))
        if attack["name"] in survived:
            row = survived[attack["name"]]
            table.add_row(
                f"  robust after {attack['name']}",
                _with_interval(row["robust_acc"], row["robust_ci95"]),
            )
    if report.transfer_from is not None:
        table.add_row(
            f"examples crafted on {report.transfer_from}", f"{report.transfer_acc:.2%} accuracy"
        )
        last = report.per_attack[-1]
        both = _with_interval(last["robust_acc"], last["robust_ci95"])
        table.add_row("  robust after both", both)
    table.add_row("time", f"{report.seconds:.1f} s")
    return table


def _with_interval(accuracy: float, interval: Sequence[float]) -> str:
    low, high = interval
    return f"{accuracy:.2%}  [95% CI {low:.2%} - {high:.2%}]"


def _settings(attack: Dict) -> str:
    """An attack's budget and effort, as the attack counts it."""
    settings = f"{attack['norm']} eps {attack['eps']:.4g}, "
    if attack["method"] == "square":
        settings += f"{attack['queries']} queries"
    else:
        settings += f"{attack['steps']} steps"
    if attack["method"] == "pgd":
        settings += f" of {attack['step_size']:.4g}"
    if attack["method"] in ("apgd-t", "fab-t"):
        settings += f", {attack['targets']} target classes"
    return f"{settings}, {attack['restarts']} restart(s)"
