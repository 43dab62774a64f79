"""Fast and robust: every conversion the README offers, and what --max-robust-drop picks.

For one model this converts it with each rule and goal of the README (the MAC target
untuned and tuned, speed goals, the calibrated MAC target) and runs the search
`convert --max-robust-drop D --dataset CALIB --tune ort` itself, then measures every
result side by side: throughput on onnxruntime at --batch (all models timed interleaved in
one process, the original twice as the run's A/A control), clean and robust accuracy
(PGD l_inf through the mirror, verdicts from onnxruntime) on a seeded random subset of the
held-out split, with Wilson 95 % intervals. Prints a markdown table; the row the search
picked is marked, against the goal: >= 2.3x faster with <= 1 point of robust and <= 2
points of clean accuracy lost (the paper's VGG-16 on a Jetson: 2.3x at about one point).
--finetune STEPS adds every row fine-tuned and the search with fine-tuned probes;
--plot draws the front (speed-up against robust and clean accuracy lost) with the paper's
point; --front-of draws it from several runs' --json files.

    .venv/bin/python benchmarks/joint.py ../shared/models/robust_vgg16_photos.onnx \\
        --test npz:../shared/models/photos_rgb_test.npz \\
        --calib npz:../shared/models/photos_rgb_calib.npz --eps 8/255 --step-size 2/255
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import time_with_control
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import load_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.pipeline.calibrated import DropNotKeptError, convert_calibrated
from gdws_deploy.pipeline.convert import ConvertReport, convert_file
from gdws_deploy.robustness.attacks import make_attacks, parse_fraction
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.data import Dataset, load_dataset
from gdws_deploy.speed.backends import Timing, backend_named
from gdws_deploy.speed.cost_model import model_input_shape

# (label, options, calibrated): every rule and goal the README offers, as a user types them.
ROWS = (
    ("--mac-reduction 2 (untuned)", {"mac_reduction": 2.0}, False),
    ("--mac-reduction 2 --tune ort", {"mac_reduction": 2.0, "tune": "ort"}, False),
    ("--mac-reduction 3 --tune ort", {"mac_reduction": 3.0, "tune": "ort"}, False),
    (
        "--mac-reduction 2 --speed-ratio 0.8 --tune ort",
        {"mac_reduction": 2.0, "speed_ratio": 0.8, "tune": "ort"},
        False,
    ),
    ("--speedup 2.3 --tune ort", {"speedup": 2.3, "tune": "ort"}, False),
    (
        "--mac-reduction 4 --speed-ratio 0.8 --tune ort",
        {"mac_reduction": 4.0, "speed_ratio": 0.8, "tune": "ort"},
        False,
    ),
    ("--mac-reduction 2 --dataset CALIB --tune ort", {"mac_reduction": 2.0, "tune": "ort"}, True),
    (
        "--mac-reduction 3 --speed-ratio 0.8 --tune ort",
        {"mac_reduction": 3.0, "speed_ratio": 0.8, "tune": "ort"},
        False,
    ),
)
TIMING = Timing(rounds=6, queries=6, seconds=1.0, warmup_ms=100.0)
GOAL_SPEEDUP, GOAL_ROBUST_DROP, GOAL_CLEAN_DROP = 2.3, 0.01, 0.02


@dataclass
class Row:
    label: str
    path: Path
    report: Optional[ConvertReport] = None
    seconds: float = 0.0
    clean: float = 0.0
    robust: float = 0.0
    white_box: float = 0.0
    ci: tuple = (0.0, 0.0)
    searched: bool = False
    failed: bool = False


def main(argv: Sequence[str] = ()) -> int:
    args = _parser().parse_args(list(argv) or None)
    if args.front_of:
        if not args.plot:
            sys.exit("--front-of draws --plot: give it")
        _plot_front(_merged(args.front_of), Path(args.plot), args)
        return 0
    attacks = tuple(
        make_attacks(
            "pgd-linf",
            {"linf": parse_fraction(args.eps)},
            args.steps,
            {"linf": parse_fraction(args.step_size)} if args.step_size else None,
        )
    )
    held_out = load_dataset(args.test)
    order = np.random.default_rng(args.seed).permutation(len(held_out))
    test = RobustnessCheck(_subset(held_out, order[: args.limit], args.seed), attacks)
    test = test.transferred_from(args.model)  # robust: the worse of white-box and transfer
    if args.calib == args.test:  # calibrate on the held-out split's other samples
        calib_data = _subset(held_out, order[args.limit :][: args.calib_limit], args.seed)
    else:
        calib_source = load_dataset(args.calib)
        picked = np.random.default_rng(args.seed + 1).permutation(len(calib_source))
        calib_data = _subset(calib_source, picked[: args.calib_limit], args.seed + 1)
    calib = RobustnessCheck(calib_data, attacks)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gdws-joint-") as scratch:
        work = Path(scratch)
        base = ConvertOptions(tune_batch=args.batch, tune_cache=work / "tune-cache.json")
        rows = [Row("original", Path(args.model))]
        for label, changes, calibrated in () if args.search_only else _chosen_rows(args.rows):
            rows.append(_converted(args.model, work, label, base, changes, calibrated, calib))
            done = "failed" if rows[-1].failed else "converted"
            print(f"[{time.perf_counter() - start:.0f} s] {label}: {done}", file=sys.stderr)
        for search in () if args.no_search else _searches(args):
            refine = _refine(args) if search == "finetune" else None
            rows.append(_searched(args, work, base, calib, refine))
            print(f"[{time.perf_counter() - start:.0f} s] {search} search done", file=sys.stderr)
        _measure_speed(rows, args.batch, args.threads)
        if args.finetune:
            train = load_dataset(args.train)
            for row in [row for row in rows[1:] if not (row.failed or row.searched)]:
                rows.append(_finetuned(row, work, train, args))
                print(
                    f"[{time.perf_counter() - start:.0f} s] {row.label}: fine-tuned",
                    file=sys.stderr,
                )
        for row in (row for row in rows if not row.failed):
            report = test.evaluate(row.path)
            row.clean, row.robust, row.ci = report.clean_acc, report.robust_acc, report.robust_ci95
            row.white_box = report.per_attack[len(attacks) - 1]["robust_acc"]
            print(f"[{time.perf_counter() - start:.0f} s] {row.label}: evaluated", file=sys.stderr)
    _print_table(rows, test, args)
    if args.plot:
        _plot_front([_record(row, rows[0]) for row in rows], Path(args.plot), args)
    if args.json:
        Path(args.json).write_text(json.dumps([_record(row, rows[0]) for row in rows], indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--test", default="photos", help="held-out split, judged on")
    parser.add_argument(
        "--calib",
        default="photos:train",
        help="split the search calibrates on (the --test split: its samples not judged on)",
    )
    parser.add_argument("--limit", type=int, default=1000, help="held-out samples (seeded subset)")
    parser.add_argument(
        "--calib-limit", type=int, default=500, help="calibration samples (seeded subset)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out subset")
    parser.add_argument("--eps", default="8/255", help="l_inf budget (the model's training eps)")
    parser.add_argument("--step-size", default=None, help="PGD step [default: 2.5*eps/steps]")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--batch", type=int, default=32, help="batch tuned and timed at")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    parser.add_argument("--max-robust-drop", type=float, default=GOAL_ROBUST_DROP)
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--plot", help="draw the front here (PNG)")
    parser.add_argument(
        "--front-of",
        nargs="+",
        metavar="JSON",
        help="instead of a run: draw --plot from earlier runs' --json files (same model, "
        "held-out samples and settings)",
    )
    parser.add_argument(
        "--allocation", default="auto", help="the search's --allocation (auto: every rule)"
    )
    parser.add_argument(
        "--search-only", action="store_true", help="the original and the search's pick only"
    )
    parser.add_argument("--no-search", action="store_true", help="the README's rows only")
    parser.add_argument(
        "--searches",
        help="which searches to run, comma-separated: plain (convert --max-robust-drop), "
        "finetune (the same with --finetune STEPS) [default: plain, and finetune with --finetune]",
    )
    parser.add_argument("--rows", help="indices of the README's rows to run (0-based, comma)")
    parser.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="STEPS",
        help="also fine-tune every conversion this many steps (gdws-deploy finetune) on "
        "--train, and search with every probe fine-tuned before it is judged (--finetune)",
    )
    parser.add_argument("--train", default="photos:train", help="split fine-tuned on")
    parser.add_argument("--finetune-attack-steps", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=0.001)
    return parser


def _chosen_rows(indices: Optional[str]) -> Sequence[tuple]:
    if indices is None:
        return ROWS
    return [ROWS[int(index)] for index in indices.split(",")]


def _finetune_options(args: argparse.Namespace):
    """The fine-tune every row (and every probe of the search) gets."""
    from gdws_deploy.robustness.finetune import FinetuneOptions

    (attack,) = make_attacks(
        "pgd-linf",
        {"linf": parse_fraction(args.eps)},
        args.finetune_attack_steps,
        {"linf": parse_fraction(args.step_size)} if args.step_size else None,
    )
    return FinetuneOptions(steps=args.finetune, lr=args.finetune_lr, attack=attack)


def _searches(args: argparse.Namespace) -> List[str]:
    """The searches asked for, checked."""
    if args.searches is None:
        return ["plain", "finetune"] if args.finetune else ["plain"]
    searches = [name for name in args.searches.split(",") if name]
    unknown = set(searches) - {"plain", "finetune"}
    if unknown or ("finetune" in searches and not args.finetune):
        sys.exit(
            f"--searches takes plain and finetune (which needs --finetune), got {args.searches}"
        )
    return searches


def _refine(args: argparse.Namespace):
    """The search's refine: each probe fine-tuned as the rows are."""
    from gdws_deploy.robustness.finetune import finetune

    train, options = load_dataset(args.train), _finetune_options(args)
    return lambda model: finetune(model, train, options)[0]


def _finetuned(row: Row, work: Path, train: Dataset, args: argparse.Namespace) -> Row:
    """The conversion fine-tuned: the same graph (so the same speed), new weight values."""
    from gdws_deploy.robustness.finetune import finetune_file

    path = work / f"{row.path.stem}.finetuned.onnx"
    finetune_file(row.path, path, train, _finetune_options(args))
    label = f"{row.label} + finetune {args.finetune} steps"
    return Row(label, path, row.report, row.seconds, searched=row.searched)


def _subset(data: Dataset, picked: np.ndarray, seed: int) -> Dataset:
    """The samples of a seeded permutation's slice `picked`, in file order: data files are
    often ordered by class (the shared ones are), so a prefix would not do."""
    if len(picked) == len(data):
        return data
    picked = np.sort(picked)
    return Dataset(
        f"{data.name} ({len(picked)} of {len(data)}, seed {seed})", data.x[picked], data.y[picked]
    )


def _converted(
    model: str,
    work: Path,
    label: str,
    base: ConvertOptions,
    changes: Dict,
    calibrated: bool,
    calib: RobustnessCheck,
) -> Row:
    path = work / f"row{len(list(work.glob('row*.onnx'))):02d}.onnx"
    tuned = base if "tune" in changes else ConvertOptions()
    options = ConvertOptions.of(tuned, check_parity=False, **changes)
    try:
        if calibrated:
            _, report, _ = convert_calibrated(model, path, options, calib)
        else:
            report, _ = convert_file(model, path, options)
    except GdwsError as error:  # an unreachable goal is a result too
        print(f"{label}: {error}", file=sys.stderr)
        return Row(f"{label} (failed: {error})", Path(model), failed=True)
    return Row(label, path, report)


def _searched(
    args: argparse.Namespace, work: Path, base: ConvertOptions, calib, refine=None
) -> Row:
    label = f"--max-robust-drop {args.max_robust_drop:g} --dataset CALIB --tune ort"
    if refine is not None:
        label += f" --finetune {args.finetune}"
    path = work / f"searched{'-finetuned' if refine else ''}.onnx"
    options = ConvertOptions.of(base, tune="ort", check_parity=False, allocation=args.allocation)
    try:
        point, report, _ = convert_calibrated(
            args.model, path, options, calib, args.max_robust_drop, on_probe=_said, refine=refine
        )
    except DropNotKeptError as error:
        print(error, file=sys.stderr)
        return Row(f"{label} -> nothing kept the budget", Path(args.model), failed=True)
    best = point.best
    print(
        f"search chose {best.rule} {best.knob} {best.target:g}: calibration drop "
        f"{best.drop:+.1%} robust, {best.clean_drop:+.1%} clean",
        file=sys.stderr,
    )
    chosen = f"{label} -> {best.rule} {best.knob} {best.target:g}"
    return Row(chosen, path, report, searched=True)


def _said(probe) -> None:
    print(f"  probe {probe.summary}", file=sys.stderr)


def _measure_speed(rows: List[Row], batch: int, threads: Optional[int]) -> None:
    """Every model and the original again, timed interleaved in one process (again while
    the A/A control reads more than 5 % off: benchmarks.timing.time_with_control)."""
    backend = backend_named("ort", threads)
    rows = [row for row in rows if not row.failed]
    models = [load_model(row.path).model for row in rows]
    shape = model_input_shape(models[0], batch)
    blobs = [(model.SerializeToString(), shape) for model in [*models, models[0]]]
    seconds, control = time_with_control(backend, blobs, TIMING)
    for row, value in zip(rows, seconds):
        row.seconds = value
    rows[0].seconds = float(np.sqrt(seconds[0] * seconds[-1]))
    print(f"original A/A: {control:.2f}", file=sys.stderr)


def _print_table(rows: List[Row], test: RobustnessCheck, args: argparse.Namespace) -> None:
    original = rows[0]
    print(
        f"\n{test.dataset.name}, PGD-{args.steps} l_inf {args.eps}, onnxruntime CPU, batch "
        f"{args.batch}; goal: >= {GOAL_SPEEDUP}x faster, <= {GOAL_ROBUST_DROP:.0%} robust and "
        f"<= {GOAL_CLEAN_DROP:.0%} clean accuracy lost; robust: per sample the worse of "
        f"white-box PGD and PGD transferred from the original\n"
    )
    print(
        "| # | conversion | fewer MACs | speed-up | robust [95% CI] | white-box only | clean "
        "| meets goal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for index, row in enumerate(rows):
        if row.failed:
            print(f"| {index} | {row.label} | - | - | - | - | - | no |")
            continue
        record = _record(row, original)
        meets = "-" if row is original else ("yes" if record["meets_goal"] else "no")
        label = f"**{row.label}**" if row.searched else row.label
        print(
            f"| {index} | {label} | {record['reduction']:.2f}x | {record['speedup']:.2f}x | "
            f"{row.robust:.1%} [{row.ci[0]:.1%}, {row.ci[1]:.1%}] | {row.white_box:.1%} | "
            f"{row.clean:.1%} | {meets} |"
        )


def _merged(paths: Sequence[str]) -> List[Dict]:
    """The rows of several runs' --json files (same model and held-out samples), the
    original once: the first file's."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    return [*runs[0], *(record for run in runs[1:] for record in run[1:])]


def _plot_front(rows: List[Dict], path: Path, args: argparse.Namespace) -> None:
    """Robust and clean accuracy lost against speed-up, one numbered point per row (the
    table's #; rows are _record's), the goal's corner shaded and the paper's point marked."""
    from matplotlib.figure import Figure

    from gdws_deploy.atomic import atomic_path

    original = rows[0]
    records = [(i, record) for i, record in enumerate(rows) if not record.get("failed")]
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    panels = figure.subplots(1, 2, sharex=True)
    for panel, key, goal in zip(panels, ("robust", "clean"), (GOAL_ROBUST_DROP, GOAL_CLEAN_DROP)):
        drops = [100 * (original[key] - record[key]) for _, record in records]
        speedups = [record["speedup"] for _, record in records]
        colours = ["tab:red" if record["searched"] else "tab:blue" for _, record in records]
        panel.scatter(speedups, drops, c=colours, s=40, zorder=3)
        for (index, _), x, y in zip(records, speedups, drops):
            panel.annotate(str(index), (x, y), textcoords="offset points", xytext=(4, 4))
        panel.axhspan(-100, 100 * goal, xmin=0, xmax=1, color="0.92", zorder=0)
        panel.axvline(GOAL_SPEEDUP, color="0.6", linestyle="--", zorder=1)
        panel.axhline(100 * goal, color="0.6", linestyle="--", zorder=1)
        panel.set_ylim(min(min(drops), 0) - 1, max(drops) + 2)
        panel.set_xlabel(f"speed-up (onnxruntime CPU, batch {args.batch})")
        panel.set_ylabel(f"{key} accuracy lost (points)")
        panel.grid(alpha=0.3)
    panels[0].scatter(
        [GOAL_SPEEDUP], [100 * GOAL_ROBUST_DROP], marker="*", s=220, color="black", zorder=4,
        label="paper: VGG-16, CIFAR-10, Jetson Xavier (2.3x, about 1 point)",
    )  # fmt: skip
    panels[0].legend(loc="upper left", fontsize="small")
    figure.suptitle(
        f"{Path(args.model).name}: {args.limit} held-out samples, PGD-{args.steps} "
        f"l_inf {args.eps}\nred: the search's pick; shaded: within the accuracy goal"
    )
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def _record(row: Row, original: Row) -> Dict:
    speedup = original.seconds / row.seconds if row.seconds else 1.0
    reduction = row.report.reduction if row.report else 1.0
    return {
        "conversion": row.label,
        "reduction": reduction,
        "speedup": speedup,
        "clean": row.clean,
        "robust": row.robust,
        "robust_ci95": list(row.ci),
        "white_box": row.white_box,
        "searched": row.searched,
        "failed": row.failed,
        "meets_goal": speedup >= GOAL_SPEEDUP
        and original.robust - row.robust <= GOAL_ROBUST_DROP + 1e-12
        and original.clean - row.clean <= GOAL_CLEAN_DROP + 1e-12,
    }


if __name__ == "__main__":
    sys.exit(main())
