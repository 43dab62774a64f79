"""`gdws-deploy convert`: rewrite a model's KxK convs into GDWS form, layer table included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.commands.args.attack import AttackArgs
from gdws_deploy.commands.args.data import DataArgs
from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.gdws.allocation import ALLOCATIONS

if TYPE_CHECKING:
    from gdws_deploy.pipeline.convert import ConvertReport
    from gdws_deploy.pipeline.operating_point import OperatingPoint

DEFAULT_MAC_REDUCTION = 2.0
LOWERING_CHOICES = ("auto", "gather", "pad", "sum", "fold", "dense")
TUNE_CHOICES = ("ort", "trt")
ALLOCATION_HELP = "How a MAC target shares kernels across layers: " + "; ".join(
    f"{name}: {text}" for name, text in ALLOCATIONS.items()
)
# Below this many eligible layers the factoring is too quick for a progress bar.
PROGRESS_MIN_LAYERS = 8
WIDE_OUTPUT = 160
# The --allocation flag, shared by convert and sweep.
allocation_option = click.option(
    "--allocation",
    type=click.Choice(list(ALLOCATIONS)),
    default="auto",
    show_default=True,
    help=ALLOCATION_HELP,
)


attack_options = AttackArgs()


def dataset_options(batch_size: int, required: bool = True) -> DataArgs:
    return DataArgs(batch_size, required)


def attacks_from(attack_names, eps, steps, step_size, restarts):
    return AttackArgs.build(
        dict(
            attack_names=attack_names, eps=eps, steps=steps, step_size=step_size, restarts=restarts
        )
    )


class _Number(click.ParamType):
    """A numeric flag whose bad value is a GdwsError, so the CLI answers in one line."""

    def __init__(self, cast: type) -> None:
        self.cast = cast
        self.name = cast.__name__

    def convert(self, value, param, ctx):
        try:
            return self.cast(value)
        except (TypeError, ValueError):
            flag = param.opts[0] if param is not None else "value"
            raise GdwsError(f"{flag} must be a number ({self.name}), got {value!r}") from None


@click.command("convert")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output model [default: <stem>.gdws.onnx next to MODEL].",
)
@click.option(
    "--beta", type=_Number(float), metavar="B", help="Per layer (LEGO): fewest kernels, error <= B."
)
@click.option(
    "--budget", type=_Number(int), metavar="N", help="Per layer (MEGO): at most N kernels."
)
@click.option(
    "--mac-reduction",
    type=_Number(float),
    metavar="R",
    help=f"Whole model: R times fewer MACs, least error [default: {DEFAULT_MAC_REDUCTION:g} "
    "when no target is given].",
)
@click.option("--alphas", type=click.Path(path_type=Path), help="npz of channel weights per Conv.")
@click.option("--all-layers", is_flag=True, help="Convert the first conv too.")
@click.option(
    "--include", multiple=True, metavar="GLOB", help="Only Convs named like GLOB (repeatable)."
)
@click.option(
    "--exclude", multiple=True, metavar="GLOB", help="Leave Convs named like GLOB (repeatable)."
)
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path), help="Also write the table as JSON."
)
@click.option("--no-parity", is_flag=True, help="Skip the onnxruntime parity check.")
@click.option(
    "--lowering",
    type=click.Choice(LOWERING_CHOICES),
    default="auto",
    show_default=True,
    help="How GDWS layers are written: gather (exact factors), pad (no Gather), fold "
    "(the producer emits the channels), dense (keep), auto (per layer).",
)
@click.option(
    "--tune",
    type=click.Choice(TUNE_CHOICES),
    help="With --lowering auto: time each layer's forms on this backend and pick the "
    "fastest; the result is timed against MODEL and never slower.",
)
@click.option(
    "--tune-batch",
    type=_Number(int),
    metavar="N",
    help="Batch size to tune at [default: MODEL's fixed batch, else 1: edge latency].",
)
@click.option(
    "--tune-threads",
    type=_Number(int),
    metavar="N",
    help="onnxruntime threads for --tune ort [default: onnxruntime's].",
)
@click.option(
    "--tune-cache",
    type=click.Path(path_type=Path),
    help="JSON file of measured layer times, read and updated (reused across runs).",
)
@click.option(
    "--speedup",
    type=_Number(float),
    metavar="S",
    help="With --tune: at least S times faster than MODEL on that backend, least error; "
    "alone or with --mac-reduction. Each layer takes dense or m kernels per channel, "
    "timed inside the whole model.",
)
@click.option(
    "--speed-ratio",
    type=_Number(float),
    metavar="E",
    help="With --tune and --mac-reduction: a speed-up at least E times the MAC reduction "
    "reached (0.8: every MAC removed buys 80 % of its share of time), least error.",
)
@allocation_option
@click.option(
    "--max-robust-drop",
    type=_Number(float),
    metavar="D",
    help="Search the largest MAC reduction losing at most D robust accuracy (0.01: one "
    "point) on --dataset, instead of a fixed target.",
)
@dataset_options(batch_size=128, required=False)
@attack_options
def convert_command(
    model: Path,
    output: Optional[Path],
    beta: Optional[float],
    budget: Optional[int],
    mac_reduction: Optional[float],
    alphas: Optional[Path],
    all_layers: bool,
    include: Sequence[str],
    exclude: Sequence[str],
    report_path: Optional[Path],
    no_parity: bool,
    lowering: str,
    tune: Optional[str],
    tune_batch: Optional[int],
    tune_threads: Optional[int],
    tune_cache: Optional[Path],
    speedup: Optional[float],
    speed_ratio: Optional[float],
    allocation: str,
    max_robust_drop: Optional[float],
    dataset: Optional[str],
    limit: Optional[int],
    batch_size: int,
    mean: Optional[str],
    std: Optional[str],
    seed: int,
    attack_names: str,
    eps: Optional[str],
    steps: int,
    step_size: Optional[str],
    restarts: int,
) -> None:
    """Rewrite the KxK convolutions of MODEL (ONNX) into GDWS form.

    Give one target: --beta, --budget, --mac-reduction, --speedup (with --tune; may join
    --mac-reduction; or --speed-ratio with it), or --max-robust-drop with --dataset. With
    --dataset, a MAC target is calibrated on that data (measured loss curves for the default
    allocation). Prints one row per Conv (its lowering too) and the parity of the result
    against MODEL in onnxruntime.
    """
    from gdws_deploy.speed.backends import backend_named

    _check_calibration(max_robust_drop, dataset, beta, budget, mac_reduction)
    if (speedup, speed_ratio) != (None, None) and max_robust_drop is not None:
        raise GdwsError("a speed goal and --max-robust-drop's MAC search do not mix: give one")
    if (speedup, speed_ratio) != (None, None) and tune is None:
        raise GdwsError("--speedup and --speed-ratio are measured: give --tune ort|trt too")
    if speed_ratio is not None and mac_reduction is None:  # never the default's silent 2x
        raise GdwsError("--speed-ratio is a share of the MAC reduction: give --mac-reduction too")
    if beta is None and budget is None and mac_reduction is None and speedup is None:
        mac_reduction = DEFAULT_MAC_REDUCTION
    output = output or model.with_name(f"{model.stem}.gdws.onnx")
    if report_path is not None:
        check_output_path(report_path, model, output)
        if report_path.resolve() == output.resolve():
            raise GdwsError("--report must differ from the output model path")
    errors = Console(stderr=True)
    options = dict(
        alphas=alphas,
        all_layers=all_layers,
        include=include,
        exclude=exclude,
        lowering=lowering,
        tune=backend_named(tune, tune_threads),
        tune_batch=tune_batch,
        tune_cache=tune_cache,
        allocation=allocation,
        speedup=speedup,
        speed_ratio=speed_ratio,
    )
    console = Console()
    if not console.is_terminal:  # logs and pipes: keep whole layer names on one line
        console.width = max(console.width, WIDE_OUTPUT)
    search = None
    existed = output.exists()
    if dataset is None:
        with LayerProgress(errors) as progress:
            report, rewritten = _convert_file(
                model, output, beta, budget, mac_reduction, not no_parity, progress, options
            )
    else:
        from gdws_deploy.commands.sweep import robustness_check, search_table

        attacks = attacks_from(attack_names, eps, steps, step_size, restarts)
        check = robustness_check(dataset, limit, batch_size, mean, std, seed, "ort", attacks)
        search, report, rewritten = _calibrated(
            model, output, check, max_robust_drop, mac_reduction, not no_parity, options, errors
        )
        if search is not None:
            console.print(search_table(search))
        if report is None:
            raise GdwsError(
                f"no MAC reduction keeps the robust drop within {max_robust_drop:g}: "
                "nothing written"
            )
    console.print(_layer_table(report))
    console.print(_totals(report))
    for note in report.notes:
        errors.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    _warn_if_deviating(report, errors)
    if (speedup, speed_ratio) != (None, None) and rewritten:
        _warn_if_short(report, speedup, speed_ratio, errors)
    if report_path is not None:
        with atomic_open(report_path) as handle:
            record = {**report.to_dict(), "input": str(model), "output": str(output)}
            if search is not None:
                record["search"] = search.to_dict()
            json.dump(record, handle, indent=2)
    verb = "replaced" if existed else "wrote"
    if report.already_met:
        done = f"target already met ({report.target}): {verb} {output} unchanged"
    else:
        done = f"{verb} {output}"
    console.print(done, markup=False, highlight=False)


def _check_calibration(
    max_robust_drop: Optional[float],
    dataset: Optional[str],
    beta: Optional[float],
    budget: Optional[int],
    mac_reduction: Optional[float],
) -> None:
    """Calibration data serves a MAC target; --max-robust-drop chooses that target."""
    if max_robust_drop is None:
        if dataset is not None and (beta is not None or budget is not None):
            raise GdwsError(
                "--dataset calibrates a MAC-reduction target; --beta and --budget do not use it"
            )
        return
    from gdws_deploy.pipeline.operating_point import check_max_drop

    check_max_drop(max_robust_drop)
    if beta is not None or budget is not None or mac_reduction is not None:
        raise GdwsError(
            "--max-robust-drop chooses the MAC reduction itself: leave out "
            "--beta, --budget and --mac-reduction"
        )
    if dataset is None:
        raise GdwsError("--max-robust-drop needs --dataset CALIB, the data the drop is measured on")


def _convert_file(model, output, beta, budget, mac_reduction, parity, progress, options):
    from gdws_deploy.pipeline.convert import convert_file

    return convert_file(
        model,
        output,
        beta=beta,
        budget=budget,
        mac_reduction=mac_reduction,
        check_parity=parity,
        progress=progress,
        stage=progress and progress.stage,
        **options,
    )


def _warn_if_deviating(report: ConvertReport, errors: Console) -> None:
    """One line on stderr when the converted model's outputs moved far from MODEL's."""
    from gdws_deploy.ir.parity import PARITY_WARNING

    if report.parity is not None and report.parity > PARITY_WARNING:
        errors.print(
            f"[yellow]warning:[/] outputs deviate from MODEL's by {report.parity:.3g} of their "
            f"range (over {PARITY_WARNING:g}): check accuracy with gdws-deploy eval",
            soft_wrap=True,
        )


def _warn_if_short(
    report: ConvertReport, speedup: Optional[float], speed_ratio: Optional[float], errors: Console
) -> None:
    """A warning where the converted model measured short of its speed goal."""
    from gdws_deploy.speed.goals import SpeedGoal

    wanted = SpeedGoal(speedup, speed_ratio).wanted(report.reduction)
    if report.measured_speedup < wanted:
        errors.print(
            f"[yellow]warning:[/] measured {report.measured_speedup:.2f}x, short of the "
            f"{wanted:.2f}x asked (layer times measured in the whole model add up only roughly)",
            soft_wrap=True,
        )


def _calibrated(
    model: Path,
    output: Path,
    check,
    max_robust_drop: Optional[float],
    mac_reduction: Optional[float],
    parity: bool,
    options: dict,
    errors: Console,
) -> Tuple[Optional[OperatingPoint], Optional[ConvertReport], bool]:
    """A MAC target calibrated on data: fixed, or searched for --max-robust-drop.

    The search, the report (None: no target keeps the drop) and whether the output holds
    a rewritten model."""
    from gdws_deploy.pipeline.operating_point import convert_within_drop
    from gdws_deploy.pipeline.options import ConvertOptions
    from gdws_deploy.robustness.sensitivity import calibrate

    check_output_path(output, model)
    errors.print(f"[dim]calibrating on {len(check.dataset)} samples of {check.dataset.name}[/]")
    calibrated = calibrate(model, check, ConvertOptions.of(**options))
    options.update({k: getattr(calibrated, k) for k in ("spectra_cache", "loss_curves", "alphas")})
    if max_robust_drop is None:
        report, rewritten = _convert_file(
            model, output, None, None, mac_reduction, parity, None, options
        )
        return None, report, rewritten

    def said(probe) -> None:
        if probe.drop is not None:
            errors.print(f"[dim]probe {probe.target:g}x: robust drop {probe.drop:+.1%}[/]")

    search, report = convert_within_drop(
        model,
        output,
        max_robust_drop,
        check,
        ConvertOptions.of(check_parity=parity, **options),
        on_probe=said,
    )
    return search, report, report is not None and report.converted > 0


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


def _layer_table(report: ConvertReport) -> Table:
    """One row per Conv: kernels and MACs, or why it was left alone."""
    table = Table(title=f"GDWS conversion ({report.target})", title_justify="left")
    table.add_column("Conv")
    for column in ("weight", "G", "MACs before -> after"):
        table.add_column(column, justify="right")
    table.add_column("lowering")
    table.add_column("speed-up", justify="right")
    table.add_column("weighted error (or why left dense)")
    for layer in report.layers:
        name, shape = escape(layer.name), "x".join(str(d) for d in layer.weight_shape)
        lowering = layer.lowering or "-"
        speedup = _speedup(layer.speedup)
        if layer.kernels is None:
            why = f"[dim]{escape(layer.skipped or '')}[/]"
            table.add_row(name, shape, "-", _macs(layer.macs_before), lowering, speedup, why)
            continue
        macs = f"{_macs(layer.macs_before)} -> {_macs(layer.macs_after)}"
        row = (str(layer.kernels), macs, lowering, speedup, f"{layer.error:.4g}")
        table.add_row(name, shape, *row)
    return table


def _totals(report: ConvertReport) -> str:
    parity = "not checked" if report.parity is None else f"{report.parity:.3g}"
    totals = (
        f"total MACs {_macs(report.macs_before)} -> {_macs(report.macs_after)} "
        f"({report.reduction:.2f}x fewer), {report.converted} Conv(s) rewritten, "
        f"parity (max relative output deviation vs MODEL in onnxruntime) {parity}"
    )
    if report.measured_speedup is not None:
        totals += f"\nmeasured {report.measured_speedup:.2f}x faster than MODEL on {report.tuned}"
    return totals


def _speedup(speedup: Optional[float]) -> str:
    """A layer's dense / GDWS time; the cost model floors a form at 1% of dense."""
    from gdws_deploy.speed.cost_model import MIN_SHARE

    if speedup is None:
        return "-"
    return f"{speedup:.2f}x" if speedup < 1 / MIN_SHARE else f">={1 / MIN_SHARE:.0f}x"


def _macs(count: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)
