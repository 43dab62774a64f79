"""Do a few hundred steps of PGD fine-tuning win back the robust accuracy a cut lost?

Converts the model aggressively (GDWS or GKP at a MAC target), fine-tunes the result with
`gdws_deploy.robustness.finetune` on the calibration split, and measures the original, the
cut and the fine-tuned model on the held-out split (PGD l_inf through the torch mirror,
verdicts from onnxruntime, one seed). The fine-tuned model has the cut's graph: same
nodes and MACs, new weight values. Prints a markdown table and the command.

    .venv/bin/python benchmarks/finetune_recovery.py models/robust_photos.onnx \\
        --mac-reduction 4 --steps 300
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import List, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.ir.graph import load_model
from gdws_deploy.pipeline.convert import convert
from gdws_deploy.robustness.attacks import make_attacks, parse_fraction
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.evaluate import EvalReport, evaluate
from gdws_deploy.robustness.finetune import FinetuneOptions, finetune


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="models/robust_photos.onnx")
    parser.add_argument("--method", default="gdws", help="compression pass: gdws or gkp")
    parser.add_argument("--mac-reduction", type=float, default=4.0)
    parser.add_argument("--train", default="photos:train", help="split fine-tuned on")
    parser.add_argument("--dataset", default="photos", help="held-out split, measured on")
    parser.add_argument("--limit", type=int, default=500, help="held-out samples")
    parser.add_argument("--eps", default="4/255", help="l_inf budget (the model's training eps)")
    parser.add_argument("--eval-steps", type=int, default=10, help="PGD steps of the verdicts")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    parser.add_argument("--train-attack-steps", type=int, default=5, help="PGD steps per batch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--control",
        action="store_true",
        help="also fine-tune the original the same way (is it the cut that is won back, or "
        "the original that was under-trained?)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest on a busy machine)"
    )
    args = parser.parse_args(list(argv) or None)
    torch.set_num_threads(args.threads)
    eps = {"linf": parse_fraction(args.eps, "--eps")}
    verdict_attacks = make_attacks("pgd-linf", eps, args.eval_steps)
    (train_attack,) = make_attacks("pgd-linf", eps, args.train_attack_steps)
    held_out = load_dataset(args.dataset, args.limit)
    train = load_dataset(args.train)

    def measure(model) -> EvalReport:
        return evaluate(model, held_out, verdict_attacks, batch_size=128, seed=args.seed)

    loaded = load_model(args.model)
    cut, conversion = convert(
        loaded, method=args.method, mac_reduction=args.mac_reduction, check_parity=False
    )
    options = FinetuneOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        attack=train_attack,
        seed=args.seed,
    )
    start = time.perf_counter()
    tuned, _ = finetune(cut, train, options)
    finetune_s = time.perf_counter() - start
    tuned_name = f"+ fine-tune {args.steps} steps"
    rows = [
        ("original", conversion.macs_before, measure(loaded)),
        (f"{args.method} {args.mac_reduction:g}x", conversion.macs_after, measure(cut)),
        (tuned_name, conversion.macs_after, measure(tuned)),
    ]
    if args.control:
        control, _ = finetune(loaded, train, options)
        rows.insert(1, (f"original {tuned_name}", conversion.macs_before, measure(control)))
    print(" ".join(["python", *map(shlex.quote, sys.argv)]))
    print(
        f"\nheld out: {len(held_out)} samples of {args.dataset}, PGD-{args.eval_steps} l_inf "
        f"{args.eps}; fine-tuned on {len(train)} samples of {args.train}, "
        f"{args.steps} steps x {args.batch_size}, PGD-{args.train_attack_steps}, lr "
        f"{args.lr:g} (cosine), {finetune_s:.0f} s\n"
    )
    print("\n".join(table(rows)))
    return 0


def table(rows: Sequence[tuple]) -> List[str]:
    lines = ["| model | MACs | clean | robust (95 % CI) |", "|---|---:|---:|---:|"]
    for name, macs, result in rows:
        low, high = result.robust_ci95
        lines.append(
            f"| {name} | {macs / 1e6:.2f} M | {result.clean_acc:.1%} | "
            f"{result.robust_acc:.1%} ({low:.1%}-{high:.1%}) |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
