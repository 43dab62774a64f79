"""`gdws-deploy eval`: clean and robust accuracy of a model as its backend runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gdws_deploy.atomic import atomic_open, check_output_path

if TYPE_CHECKING:
    from gdws_deploy.robustness.attacks import Attack
    from gdws_deploy.robustness.evaluate import EvalReport

DATASET_HELP = "digits[:train], photos[:train], npz:PATH, cifar10:DIR or svhn:FILE.mat."


class BatchProgress:
    """A transient progress bar over samples, on stderr terminals only."""

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
            )
            self.bar = Progress(*columns, console=self.console, transient=True)
            self.bar.add_task("", total=total)
            self.bar.start()
        self.bar.update(self.bar.task_ids[0], completed=done)


def dataset_options(batch_size: int, required: bool = True) -> Callable[[Callable], Callable]:
    """--dataset, --limit, --batch-size, --mean, --std, --seed: shared by the verbs that
    measure on data (eval, alphas; convert and sweep, where --dataset calibrates)."""
    options = [
        click.option("--dataset", required=required, metavar="SPEC", help=DATASET_HELP),
        click.option("--limit", type=click.IntRange(min=1), help="Use the first N samples."),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=batch_size, show_default=True
        ),
        click.option("--mean", metavar="M[,M...]", help="Per-channel mean the model expects."),
        click.option("--std", metavar="S[,S...]", help="Per-channel std the model expects."),
        click.option("--seed", type=int, default=0, show_default=True),
    ]

    return _stacked(options)


def attack_options(command: Callable) -> Callable:
    """--attack, --eps, --steps, --step-size, --restarts; `attacks_from` reads them."""
    options = [
        click.option(
            "--attack",
            "attack_names",
            default="pgd-linf",
            show_default=True,
            metavar="A[,A...]",
            help="pgd-linf, pgd-l2, pgd-l1, apgd-ce, apgd-dlr, apgd-ce-l2, apgd-dlr-l2; "
            "the worst case per sample counts.",
        ),
        click.option(
            "--eps",
            metavar="E | NORM=E,...",
            help="Budget, e.g. 8/255 or linf=8/255,l2=0.5 [default: linf 8/255, l2 0.5, l1 12].",
        ),
        click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True),
        click.option(
            "--step-size", metavar="S | NORM=S,...", help="PGD step [default: 2.5*eps/steps]."
        ),
        click.option("--restarts", type=click.IntRange(min=1), default=1, show_default=True),
    ]
    return _stacked(options)(command)


def attacks_from(
    attack_names: str, eps: Optional[str], steps: int, step_size: Optional[str], restarts: int
) -> List[Attack]:
    """The attacks the flags of `attack_options` describe."""
    from gdws_deploy.robustness.attacks import make_attacks, parse_per_norm

    return make_attacks(
        attack_names,
        parse_per_norm(eps, "--eps"),
        steps,
        parse_per_norm(step_size, "--step-size"),
        restarts,
    )


def _stacked(options: List[Callable]) -> Callable[[Callable], Callable]:
    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@dataset_options(batch_size=128)
@click.option(
    "--backend",
    default="ort",
    show_default=True,
    help="Runtime that gives the verdict: ort, or trt with --engine.",
)
@click.option("--engine", type=click.Path(path_type=Path), help="TensorRT engine (.plan).")
@attack_options
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report.")
def eval_command(
    model: Path,
    dataset: str,
    limit: Optional[int],
    batch_size: int,
    mean: Optional[str],
    std: Optional[str],
    seed: int,
    backend: str,
    engine: Optional[Path],
    attack_names: str,
    eps: Optional[str],
    steps: int,
    step_size: Optional[str],
    restarts: int,
    json_path: Optional[Path],
) -> None:
    """Attack MODEL (ONNX) through its torch mirror and judge it on the deployed backend."""
    from gdws_deploy.robustness.attacks import parse_channels
    from gdws_deploy.robustness.data import load_dataset
    from gdws_deploy.robustness.evaluate import evaluate

    attacks = attacks_from(attack_names, eps, steps, step_size, restarts)
    if json_path is not None:
        check_output_path(json_path, model, *([engine] if engine else []))
    data = load_dataset(dataset, limit)
    with BatchProgress("attacking") as progress:
        report = evaluate(
            model,
            data,
            attacks,
            backend=backend,
            engine=engine,
            batch_size=batch_size,
            mean=parse_channels(mean, "--mean"),
            std=parse_channels(std, "--std"),
            seed=seed,
            progress=progress,
        )
    Console().print(report_table(report))
    if json_path is not None:
        with atomic_open(json_path) as handle:
            json.dump(report.to_dict(), handle, indent=2)


def report_table(report: EvalReport) -> Table:
    low, high = report.robust_ci95
    table = Table(title=f"robustness of {report.model} on {report.backend}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("samples", f"{report.samples} ({report.dataset})")
    table.add_row("clean accuracy", f"{report.clean_acc:.2%}")
    table.add_row("robust accuracy", f"{report.robust_acc:.2%}  [95% CI {low:.2%} - {high:.2%}]")
    table.add_row(
        "mirror clean / robust accuracy",
        f"{report.mirror_clean_acc:.2%} / {report.mirror_robust_acc:.2%}",
    )
    table.add_row(
        "mirror vs backend disagreements",
        f"{report.disagreements_clean} clean, {report.disagreements_adv} adversarial",
    )
    for attack in report.attacks:
        settings = f"eps {attack['eps']:.4g}, {attack['steps']} steps"
        if attack["method"] == "pgd":
            settings += f" of {attack['step_size']:.4g}"
        table.add_row(f"attack {attack['name']}", f"{settings}, {attack['restarts']} restart(s)")
    table.add_row("time", f"{report.seconds:.1f} s")
    return table
