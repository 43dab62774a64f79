"""Does GDWS's MAC reduction become speed? The paper's CIFAR networks on onnxruntime CPU.

For each network (random weights, randomized BatchNorm statistics, from models/) and MAC
reduction R, `convert --mac-reduction R --speed-ratio 0.8 --tune ort --tune-batch B` is run
at each batch size B (--speed-ratio 0: `--mac-reduction R` alone, the MAC allocation with
tuned lowerings; where convert finds the ratio goal out of reach, at the most efficient
ratio it found reachable), then the original and its converted models are timed interleaved
in one process (alternating blocks, median query time) with the same thread count: a
measurement apart from the one convert made. The original is timed first and last: the
speed-up is against the geometric mean of the two, and their ratio (orig A/A) is the run's
noise floor; a timing whose A/A reads more than 5 % off is repeated (3 attempts, the best
A/A kept). Printed per row: MACs before and after, images/s of both, the speed-up, and
speed-up / MAC reduction (the achieved one, counted on the GDWS factors).
Goals: that ratio >= 0.8 at batch 32 and the speed-up never below 1.0.

    .venv/bin/python benchmarks/ort_speed.py [--models preactresnet18 vgg16]
        [--reductions 2 3 4] [--batches 1 32] [--threads 2] [--markdown] [--cache FILE]
        [--allocation relative] [--speed-ratio 0.8]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import time_with_control
from gdws_deploy.options import ConvertOptions
from gdws_deploy.pipeline.convert import ConvertReport, convert_file
from gdws_deploy.speed.backends import OrtBackend, Timing
from gdws_deploy.speed.cost_model import model_input_shape
from gdws_deploy.speed.goals import SpeedGoalOutOfReachError
from models.export import export_architecture
from models.networks import ARCHITECTURES

RATIO_GOAL = 0.8
RATIO_GOAL_BATCH = 32
# Where the ratio goal is out of reach, the ratio asked instead: this share of the most
# efficient choice's (by convert's own layer times; a hair under, so it is within reach).
REACHABLE_SHARE = 0.99
# A timing whose original-against-itself control reads off by more than this is repeated.
# Whole-model timing: a second per model per round at batch 1, a few queries at batch 32.
TIMING = {1: Timing(rounds=7, queries=35, seconds=2.0, warmup_ms=200.0)}
LARGE_BATCH_TIMING = Timing(rounds=9, queries=27, seconds=0.0, warmup_ms=200.0)


@dataclass(frozen=True)
class Row:
    model: str
    batch: int
    target: float
    report: ConvertReport
    original_ips: float
    converted_ips: float
    control: float  # the original against itself, timed alongside: 1.0 without noise
    goal_reachable: bool  # False: convert found the speed-ratio goal out of reach

    @property
    def speedup(self) -> float:
        return self.converted_ips / self.original_ips

    @property
    def ratio(self) -> float:
        return self.speedup / self.report.reduction

    @property
    def error(self) -> float:
        """The weighted error the conversion allowed, summed over layers."""
        return sum(layer.error or 0.0 for layer in self.report.layers)

    @property
    def forms(self) -> str:
        """How many layers got each lowering, e.g. '6 gather, 3 fold, 4 dense'."""
        counts = collections.Counter(r.lowering for r in self.report.layers if r.lowering)
        forms = ", ".join(f"{n} {form}" for form, n in sorted(counts.items()))
        return forms if self.goal_reachable else f"{forms} (goal out of reach: the most efficient)"


def measure_model(
    arch: str, folder: Path, args: argparse.Namespace, backend: OrtBackend
) -> List[Row]:
    """Convert `arch` at every reduction and batch, then time each batch's models together."""
    original = export_architecture(arch, folder / f"{arch}.onnx")
    rows = []
    unreachable = set()  # (batch, target) whose speed-ratio goal convert could not reach
    for batch in args.batches:
        reports: Dict[float, ConvertReport] = {}
        paths = [original]
        for target in args.reductions:
            path = folder / f"{arch}.{target:g}x.b{batch}.onnx"
            options = ConvertOptions(
                mac_reduction=target,
                tune=backend,
                tune_batch=batch,
                tune_cache=args.cache,
                allocation=args.allocation,
                check_parity=False,
            )
            reports[target], written, reached = convert_row(original, path, args, options)
            if not reached:
                unreachable.add((batch, target))
            paths.append(path if written else original)
        shape = model_input_shape(onnx.load(str(original)), batch)
        models = [(path.read_bytes(), shape) for path in [*paths, original]]
        seconds, control = time_with_control(backend, models, TIMING.get(batch, LARGE_BATCH_TIMING))
        baseline = float(np.sqrt(seconds[0] * seconds[-1]))
        for target, after in zip(args.reductions, seconds[1:-1]):
            rows.append(
                Row(
                    arch,
                    batch,
                    target,
                    reports[target],
                    batch / baseline,
                    batch / after,
                    control,
                    (batch, target) not in unreachable,
                )
            )
    return rows


def convert_row(
    original: Path, path: Path, args: argparse.Namespace, options: ConvertOptions
) -> Tuple[ConvertReport, bool, bool]:
    """convert_file's report and written flag at --speed-ratio, and whether that goal was
    within reach; out of reach, at the most efficient ratio convert found (or, where even
    that is, the MAC target alone)."""
    if not args.speed_ratio:
        return (*convert_file(original, path, options), True)
    try:
        goal = ConvertOptions.of(options, speed_ratio=args.speed_ratio)
        return (*convert_file(original, path, goal), True)
    except SpeedGoalOutOfReachError as error:
        reachable = REACHABLE_SHARE * error.speedup / error.reduction
        print(f"# {path.name}: {error}; asking {reachable:.2f}", file=sys.stderr)
    try:
        goal = ConvertOptions.of(options, speed_ratio=reachable)
        return (*convert_file(original, path, goal), False)
    except SpeedGoalOutOfReachError as error:
        print(f"# {path.name}: {error}; the MAC target alone", file=sys.stderr)
        return (*convert_file(original, path, options), False)


def print_table(rows: Sequence[Row], markdown: bool) -> None:
    header = (
        "model",
        "batch",
        "target",
        "MACs orig -> GDWS",
        "MAC red.",
        "orig img/s",
        "GDWS img/s",
        "speed-up",
        "convert's own",
        "speed-up / MAC red.",
        "error",
        "orig A/A",
        "lowerings (tuned)",
    )
    lines = [
        (
            row.model,
            str(row.batch),
            f"{row.target:g}x",
            f"{row.report.macs_before / 1e6:.0f}M -> {row.report.macs_after / 1e6:.0f}M",
            f"{row.report.reduction:.2f}x",
            f"{row.original_ips:.1f}",
            f"{row.converted_ips:.1f}",
            f"{row.speedup:.2f}x",
            f"{row.report.measured_speedup or 1.0:.2f}x",
            f"{row.ratio:.2f}",
            f"{row.error:.3g}",
            f"{row.control:.2f}",
            row.forms,
        )
        for row in rows
    ]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def print_goals(rows: Sequence[Row]) -> None:
    large = [row for row in rows if row.batch == RATIO_GOAL_BATCH]
    short = [row for row in large if row.ratio < RATIO_GOAL]
    slower = [row for row in rows if row.speedup < 1.0]
    if large:
        print(
            f"speed-up / MAC reduction >= {RATIO_GOAL} at batch {RATIO_GOAL_BATCH}: "
            f"{len(large) - len(short)}/{len(large)} rows"
            + "".join(f"\n  short: {r.model} {r.target:g}x ({r.ratio:.2f})" for r in short)
        )
    print(
        f"speed-up >= 1.0: {len(rows) - len(slower)}/{len(rows)} rows"
        + "".join(f"\n  slower: {r.model} {r.target:g}x b{r.batch}" for r in slower)
    )


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--reductions", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--cache", type=Path, help="tune cache JSON (reused across runs)")
    parser.add_argument(
        "--allocation", default="auto", help="convert's allocation rule (gdws.ALLOCATIONS)"
    )
    parser.add_argument(
        "--speed-ratio",
        type=float,
        default=RATIO_GOAL,
        help="convert's --speed-ratio: a speed-up this times the MAC reduction (0: none)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(list(argv) or None)
    backend = OrtBackend(args.threads)
    started = time.perf_counter()
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        if args.cache is None:
            args.cache = Path(folder) / "tune-cache.json"
        for arch in args.models:
            rows += measure_model(arch, Path(folder), args, backend)
            print(f"# {arch} done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    allocation = rows[0].report.allocation if rows else args.allocation
    print(
        f"onnxruntime CPU, {args.threads} threads, interleaved, median query time; "
        f"allocation {allocation}, lowering auto tuned at each batch, "
        + (f"--speed-ratio {args.speed_ratio:g}" if args.speed_ratio else "MAC target alone")
    )
    print_table(rows, args.markdown)
    print_goals(rows)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
