"""Early exits and GDWS, alone and together: one table of MACs, throughput and accuracy.

Four models from one multi-exit ONNX model: its single-pass model (`final` alone), the
multi-exit model run stage by stage with thresholds calibrated to --budget, the GDWS
conversion of the single-pass model (--mac-reduction), and both (the converted multi-exit
model, thresholds recalibrated on the same data). MACs are expected MACs on the test data
for the adaptive two; throughput is measured on the test data, all four interleaved in one
run (onnxruntime on this CPU); clean accuracy on the test data, robust accuracy on its first
--robust-limit samples: PGD on `final` for the single-pass models, the worst case of the
exit attacks (pgd-final, pgd-average, max-average, exit-aware) judged by the staged runtime
for the adaptive ones, with the compute the attacks forced.

    .venv/bin/python benchmarks/multi_exit.py [--model models/multi_exit_photos.onnx]
        [--budget 0.7] [--mac-reduction 2] [--calib photos:train] [--dataset photos]
        [--limit 1000] [--batch 64] [--duration 3] [--rounds 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.exits.calibrate import calibrate_model
from gdws_deploy.exits.split import open_staged, split_model
from gdws_deploy.pipeline.convert import convert_file
from gdws_deploy.robustness.attacks import make_attacks, parse_fraction
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.evaluate import evaluate
from gdws_deploy.robustness.exit_attacks import ExitAttackSettings, evaluate_exits
from gdws_deploy.runtime.benchmark import BenchOptions
from gdws_deploy.runtime.runner import OrtRunner
from gdws_deploy.runtime.staged_bench import time_on_data

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "multi_exit_photos.onnx"
EXIT_ATTACKS = ("pgd-final", "pgd-average", "max-average", "exit-aware")


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--mac-reduction", type=float, default=2.0)
    parser.add_argument("--calib", default="photos:train")
    parser.add_argument("--calib-limit", type=int, default=1000)
    parser.add_argument("--dataset", default="photos")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--robust-limit", type=int, default=300)
    parser.add_argument("--tune", default="ort", help="GDWS's tune backend ('' for untuned)")
    parser.add_argument("--eps", default="4/255")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(list(argv) or None)
    calib = load_dataset(args.calib, args.calib_limit)
    test = load_dataset(args.dataset, args.limit)
    with tempfile.TemporaryDirectory(prefix="gdws-multi-exit-") as scratch:
        folder = Path(scratch)
        converted = folder / "gdws.onnx"
        convert_file(
            args.model, converted, mac_reduction=args.mac_reduction, tune=args.tune,
            tune_batch=args.batch if args.tune else None,
        )  # fmt: skip
        models = {}
        for name, source in (("multi-exit", args.model), ("both", converted)):
            output = folder / f"{name}.exits.onnx"
            calibrate_model(
                source, output, calib.x, calib.y, args.budget, dataset=args.calib,
                batch_size=256, threads=args.threads,
            )  # fmt: skip
            models[name] = output
        rows = measure(models, args.model, converted, test.x, test.y, args)
    print_table(rows, args, len(test))
    return 0


def measure(
    calibrated: dict,
    original: Path,
    converted: Path,
    images: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
) -> List[Tuple[str, float, float, float, float, float]]:
    """(label, MACs, images/s, clean accuracy, robust accuracy, MACs under attack) of the
    four models; an adaptive model's under attack: per sample the most any attack forced."""
    singles = {"full model": split_model(original), "GDWS": split_model(converted)}
    runners = {
        name: OrtRunner(split.full.SerializeToString(), threads=args.threads)
        for name, split in singles.items()
    }
    staged = {name: open_staged(path, threads=args.threads) for name, path in calibrated.items()}
    try:
        for runner in runners.values():
            runner.activate()
        predicts = {name: runner.infer for name, runner in runners.items()}
        predicts.update({name: model.predict for name, model in staged.items()})
        order = ["full model", "multi-exit", "GDWS", "both"]
        options = BenchOptions(duration_s=args.duration, iterations=args.rounds)
        summaries = time_on_data(
            [predicts[n] for n in order], images, args.batch, options, args.rounds
        )
        rows = []
        for name, summary in zip(order, summaries):
            if name in staged:
                logits, exits = staged[name].predict(images)
                macs = staged[name].policy.expected_macs(exits)
                robust, share = robust_accuracy(calibrated[name], True, args)
                attacked = share * staged[name].policy.full_macs
            else:
                logits, macs = runners[name].infer(images), singles[name].policy.full_macs
                robust, attacked = robust_accuracy(singles[name].full, False, args)[0], macs
            accuracy = float(np.mean(logits.argmax(axis=1) == labels))
            rows.append((name, macs, summary.images_per_s or 0.0, accuracy, robust, attacked))
        return rows
    finally:
        for runner in runners.values():
            runner.deactivate()
        for model in staged.values():
            model.close()


def robust_accuracy(model, adaptive: bool, args: argparse.Namespace) -> Tuple[float, float]:
    """(robust accuracy, expected MAC share under attack): the worst case of the exit
    attacks for an adaptive model, PGD on the single-pass model's only output otherwise."""
    eps = parse_fraction(args.eps, "--eps")
    data = load_dataset(args.dataset, args.robust_limit)
    if adaptive:
        settings = ExitAttackSettings(eps=eps, steps=args.steps)
        report = evaluate_exits(model, data, EXIT_ATTACKS, settings, threads=args.threads)
        return report.worst.accuracy, report.worst.expected_share
    attacks = make_attacks("pgd-linf", {"linf": eps}, args.steps)
    return evaluate(model, data, attacks).robust_acc, 1.0


def print_table(rows: Sequence[tuple], args: argparse.Namespace, samples: int) -> None:
    base_macs, base_rate = rows[0][1], rows[0][2]
    print(
        f"{args.model.name}: budget {args.budget:g}, GDWS {args.mac_reduction:g}x, "
        f"calibrated on {args.calib}, measured on {samples} samples of {args.dataset}, "
        f"batch {args.batch}, onnxruntime CPU, interleaved"
    )
    header = (
        "model", "MACs (M)", "MAC share", "images/s", "speed-up", "clean", "robust",
        "MAC share attacked",
    )  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, macs, rate, clean, robust, attacked in rows:
        cells = (
            name,
            f"{macs / 1e6:.2f}",
            f"{macs / base_macs:.3f}",
            f"{rate:.0f}",
            f"{rate / base_rate:.2f}x",
            f"{clean:.1%}",
            f"{robust:.1%}",
            f"{attacked / base_macs:.3f}",
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
