"""Is a converted model's robust accuracy real? White-box PGD against transfer from the original.

A GDWS model that scores higher robust accuracy than its original may only be harder to
attack through its own gradients. This crafts PGD examples against every model given (the
original first), judges every model on every set, and prints the matrix: a converted
model's true robust accuracy is at most the smallest number in its column, and when the
row crafted on the original is the smallest, its own white-box figure overstates it.

    .venv/bin/python benchmarks/transfer_check.py ../shared/models/robust_vgg16_photos.onnx \\
        vgg.gdws.onnx --test npz:../shared/models/photos_rgb_test.npz --eps 8/255 \\
        --step-size 2/255
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.robustness.attacks import make_attacks, parse_fraction
from gdws_deploy.robustness.data import Dataset, load_dataset
from gdws_deploy.robustness.mirror import load_mirror
from gdws_deploy.robustness.transfer import crafted


def main(argv: Sequence[str] = ()) -> int:
    args = _parser().parse_args(list(argv) or None)
    data = load_dataset(args.test)
    picked = np.sort(np.random.default_rng(args.seed).permutation(len(data))[: args.limit])
    subset = Dataset(data.name, data.x[picked], data.y[picked])
    x, y = torch.from_numpy(subset.x), torch.from_numpy(subset.y)
    attacks = make_attacks(
        "pgd-linf",
        {"linf": parse_fraction(args.eps)},
        args.steps,
        {"linf": parse_fraction(args.step_size)} if args.step_size else None,
    )
    paths = [args.original, *args.converted]
    mirrors = [load_mirror(path).eval() for path in paths]
    cpu = torch.device("cpu")
    examples = [crafted(mirror, subset, attacks, args.batch, 0, cpu) for mirror in mirrors]
    names = [Path(path).name for path in paths]
    print(f"\n{len(y)} samples of {args.test} (seed {args.seed}), PGD-{args.steps} {args.eps}")
    print("accuracy (%) of the column's model on examples crafted against the row's model\n")
    print("| crafted on \\ judged on | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for name, inputs in [*zip(names, examples), ("(clean)", x)]:
        accuracies = [_accuracy(mirror, inputs, y, args.batch) for mirror in mirrors]
        print(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in accuracies) + " |")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("converted", nargs="+", help="models converted from the original")
    parser.add_argument("--test", default="photos", help="held-out data")
    parser.add_argument("--limit", type=int, default=1000, help="samples (seeded subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--step-size", default=None, help="PGD step [default: 2.5*eps/steps]")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=125)
    return parser


def _accuracy(mirror, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    with torch.no_grad():
        predicted = torch.cat([mirror(x[i : i + batch]).argmax(1) for i in range(0, len(y), batch)])
    return float((predicted == y).float().mean())


if __name__ == "__main__":
    sys.exit(main())
