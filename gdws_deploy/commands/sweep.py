"""`gdws-deploy sweep`: convert at several targets, measure robustness and speed, plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import click
from rich.console import Console
from rich.table import Table

from gdws_deploy.commands.args.attack import AttackArgs
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.commands.convert import (
    LOWERING_CHOICES,
    TUNE_CHOICES,
    WIDE_OUTPUT,
    allocation_option,
)
from gdws_deploy.errors import GdwsError

if TYPE_CHECKING:
    from gdws_deploy.pipeline.operating_point import OperatingPoint
    from gdws_deploy.pipeline.sweep import SweepResult
    from gdws_deploy.robustness.check import RobustnessCheck


attack_options = AttackArgs()


def dataset_options(batch_size: int, required: bool = True) -> DataArgs:
    return DataArgs(batch_size, required)


def attacks_from(attack_names, eps, steps, step_size, restarts):
    return AttackArgs.build(
        dict(
            attack_names=attack_names, eps=eps, steps=steps, step_size=step_size, restarts=restarts
        )
    )


@click.command("sweep")
@click.argument("model", type=click.Path(path_type=Path))
@dataset_options(batch_size=128)
@click.option(
    "--calib",
    metavar="SPEC",
    help="Data that calibrates the conversion and judges --max-robust-drop [default: --dataset].",
)
@attack_options
@click.option("--mac-reductions", metavar="R[,R...]", help="MAC targets [default: 1.5,2,3,4].")
@click.option("--betas", metavar="B[,B...]", help="Per-layer LEGO bounds instead (with alphas).")
@allocation_option
@click.option(
    "--alphas", type=click.Path(path_type=Path), help="npz of alphas [default: computed]."
)
@click.option(
    "--max-robust-drop",
    type=float,
    metavar="D",
    help="Also find the largest MAC reduction losing at most D robust accuracy (0.01: 1 point).",
)
@click.option(
    "--lowering",
    type=click.Choice(LOWERING_CHOICES),
    default="auto",
    show_default=True,
    help="How GDWS layers are written (see convert --help).",
)
@click.option(
    "--tune",
    type=click.Choice(TUNE_CHOICES),
    is_flag=False,
    flag_value="ort",
    help="Time each layer's forms on this backend at --bench-batch and keep the fastest, "
    "never slower than MODEL, as convert --tune does (a bare --tune means ort).",
)
@click.option("--backend", type=click.Choice(["ort"]), default="ort", show_default=True)
@click.option(
    "--bench-batch",
    type=click.IntRange(min=1),
    help="Batch to time at [default: 32, or MODEL's batch when its export fixes one].",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    help="Seconds of timing per model.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Interleaved timing blocks per model.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    help="onnxruntime threads [default: one per core].",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Folder [default: <stem>-sweep]. Written atomically: the files appear there only "
    "when the whole sweep succeeds; a failed or interrupted sweep leaves nothing behind.",
)
def sweep_command(
    model: Path,
    dataset: str,
    limit: Optional[int],
    batch_size: int,
    mean: Optional[str],
    std: Optional[str],
    seed: int,
    calib: Optional[str],
    attack_names: str,
    eps: Optional[str],
    steps: int,
    step_size: Optional[str],
    restarts: int,
    mac_reductions: Optional[str],
    betas: Optional[str],
    allocation: str,
    alphas: Optional[Path],
    max_robust_drop: Optional[float],
    lowering: str,
    tune: Optional[str],
    backend: str,
    bench_batch: Optional[int],
    duration: float,
    rounds: int,
    threads: int,
    out: Optional[Path],
) -> None:
    """Convert MODEL (ONNX) at several targets; measure MACs, parameters, clean and robust
    accuracy and throughput of each; write sweep.json, sweep.png and the models to --out.
    """
    from gdws_deploy.pipeline.sweep import BenchSettings, model_stem, run_sweep
    from gdws_deploy.speed.backends import backend_named

    check = robustness_check(
        dataset,
        limit,
        batch_size,
        mean,
        std,
        seed,
        backend,
        attacks_from(attack_names, eps, steps, step_size, restarts),
    )
    calibration = check
    if calib is not None:
        calibration = robustness_check(
            calib, limit, batch_size, mean, std, seed, backend, check.attacks
        )
    out = out or Path(f"{model_stem(model)}-sweep")
    errors = Console(stderr=True)
    result = run_sweep(
        model,
        out,
        check,
        calibration=calibration,
        mac_reductions=_numbers(mac_reductions, "--mac-reductions"),
        betas=_numbers(betas, "--betas"),
        allocation=allocation,
        alphas=alphas,
        max_robust_drop=max_robust_drop,
        bench=BenchSettings(bench_batch, duration, rounds, threads),
        convert_options={
            "lowering": lowering,
            "tune": backend_named(tune, threads if tune == "ort" else None),
        },
        progress=lambda message: errors.print(f"[dim]{message}[/]", highlight=False),
    )
    console = Console()
    if not console.is_terminal:  # logs and pipes: one line per point
        console.width = max(console.width, WIDE_OUTPUT)
    console.print(sweep_table(result))
    if result.operating_point is not None:
        console.print(search_table(result.operating_point))
    for line in _summary(result, out):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def robustness_check(
    spec: str,
    limit: Optional[int],
    batch_size: int,
    mean: Optional[str],
    std: Optional[str],
    seed: int,
    backend: str,
    attacks,
) -> RobustnessCheck:
    """The RobustnessCheck the dataset and attack flags describe."""
    from gdws_deploy.robustness.attacks import parse_channels
    from gdws_deploy.robustness.check import RobustnessCheck
    from gdws_deploy.robustness.data import load_dataset

    mean_values, std_values = parse_channels(mean, "--mean"), parse_channels(std, "--std")
    return RobustnessCheck(
        load_dataset(spec, limit),
        tuple(attacks),
        backend=backend,
        batch_size=batch_size,
        mean=tuple(mean_values) if mean_values else None,
        std=tuple(std_values) if std_values else None,
        seed=seed,
    )


def sweep_table(result: SweepResult) -> Table:
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
        title=f"search: largest MAC reduction losing <= {point.max_drop:.1%} robust accuracy "
        f"(original {point.robust_acc:.1%} on {point.check['samples']} samples of "
        f"{point.check['dataset']})",
        title_justify="left",
    )
    for column in ("target", "reached", "clean", "robust", "drop", "verdict"):
        table.add_column(column, justify="right")
    for probe in point.probes:
        if probe.reduction is None:
            table.add_row(f"{probe.target:g}x", "-", "-", "-", "-", probe.note)
            continue
        verdict = "within" if probe.within else "beyond"
        if probe == point.best:
            verdict = "[bold green]chosen[/]"
        table.add_row(
            f"{probe.target:g}x",
            f"{probe.reduction:.2f}x",
            f"{probe.clean_acc:.1%}",
            f"{probe.robust_acc:.1%}",
            f"{probe.drop:+.1%}",
            verdict,
        )
    return table


def _summary(result: SweepResult, out: Path) -> List[str]:
    lines = []
    best = result.operating_point and result.operating_point.best
    if result.operating_point is not None and best is None:
        lines.append("no MAC reduction keeps the robust drop within the limit: keep the original")
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


def _numbers(text: Optional[str], flag: str) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GdwsError(f"{flag} must be comma-separated numbers, got {text!r}") from None
