"""Does attacking through the ONNX mirror cost more than attacking the torch model itself?

For CIFAR-size networks with seeded random weights (BatchNorm statistics randomized), this
runs the same PGD-10 (l_inf 8/255, step 2/255, same seed) on the native torch module and on
gdws_deploy.robustness.mirror's module built from its ONNX export, same weights and batch,
alternating the two so machine load hits both alike, and prints mirror / native (goal:
<= 1.2) as the best of --repeat runs, in wall-clock and CPU time. It first checks both give
the same logits.

    .venv/bin/python benchmarks/mirror_attack_speed.py [--batch 32] [--repeat 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import add_timing_options, apply_threads, best_of, print_verdict
from gdws_deploy.robustness.attacks import pgd
from gdws_deploy.robustness.mirror import load_mirror
from models.export import export_onnx
from models.networks import ARCHITECTURES, randomize_batchnorm

GOAL = 1.2
DEFAULT_ARCHITECTURES = ("preactresnet18", "vgg16")


def attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        return pgd(model, x, y, "linf", 8 / 255, 10, 2 / 255, seed=0)

    return run


def measure(arch: str, folder: Path, batch: int, repeat: int) -> List[Tuple[float, float]]:
    torch.manual_seed(0)
    native = randomize_batchnorm(ARCHITECTURES[arch]())
    mirror = load_mirror(export_onnx(native, folder / f"{arch}.onnx"))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(mirror(x), native(x), rtol=1e-4, atol=1e-5)
    attack(native, x[:2], y[:2])()  # warm up both (kernel selection, allocator)
    attack(mirror, x[:2], y[:2])()
    return best_of([attack(native, x, y), attack(mirror, x, y)], repeat)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHITECTURES))
    parser.add_argument("--batch", type=int, default=32)
    add_timing_options(parser)
    args = parser.parse_args(list(argv) or None)
    threads = apply_threads(args)
    print(
        f"PGD-10 (l_inf 8/255) at batch {args.batch}, {threads} thread(s), best of {args.repeat}:"
    )
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch:
            native, mirror = measure(arch, Path(folder), args.batch, args.repeat)
            worst = max(worst, mirror[0] / native[0])
            print(
                f"{arch:16s} wall: native {native[0]:7.3f}s mirror {mirror[0]:7.3f}s "
                f"ratio {mirror[0] / native[0]:4.2f}x | CPU: native {native[1]:7.3f}s "
                f"mirror {mirror[1]:7.3f}s ratio {mirror[1] / native[1]:4.2f}x"
            )
    print_verdict(worst, GOAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
