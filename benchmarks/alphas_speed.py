"""How much faster are the batched alphas (eq. 8) than the per-sample loop?

For three CNNs of growing size (seeded random weights, BatchNorm statistics randomized):
  digits:    conv-BN-ReLU x2 on 1x8x8 inputs (the test suite's model)
  small_vgg: five conv-BN-ReLU layers on 1x32x32 (the bundled robust model's network)
  resnet18:  ResNet-18 on 3x32x32
this computes the alphas of every eligible Conv for the same N random inputs two ways,
alternating them so machine load hits both alike:
  loop:    gdws_deploy.robustness.alphas.accumulate_alphas_by_loop (one forward per sample, one
           backward per class to the weights; the reference the tests compare with)
  batched: gdws_deploy.robustness.alphas.accumulate_alphas (one forward, one batched backward)
and prints loop / batched (goal: >= 10) as the best of --repeat runs, wall-clock and CPU
time, after checking both agree to 1e-4.

    .venv/bin/python benchmarks/alphas_speed.py [--repeat 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import add_timing_options, apply_threads, best_of
from gdws_deploy.robustness.alphas import (
    AlphaSums,
    accumulate_alphas,
    accumulate_alphas_by_loop,
    eligible_convs,
)
from gdws_deploy.robustness.mirror import OnnxMirror
from models.export import export_onnx
from models.networks import randomize_batchnorm, resnet18, small_vgg
from tests.digits_fixtures import digits_cnn

GOAL = 10.0
# name -> (network factory, input shape without batch, samples)
MODELS = {
    "digits": (digits_cnn, (1, 8, 8), 64),
    "small_vgg": (small_vgg, (1, 32, 32), 32),
    "resnet18": (resnet18, (3, 32, 32), 8),
}


def measure(name: str, folder: Path, repeat: int) -> List[Tuple[float, float]]:
    factory, shape, samples = MODELS[name]
    torch.manual_seed(0)
    path = export_onnx(randomize_batchnorm(factory()), folder / f"{name}.onnx", (1, *shape))
    model = onnx.load(str(path))
    mirror, convs = OnnxMirror(model), eligible_convs(model)
    x = torch.rand(samples, *shape, generator=torch.Generator().manual_seed(1))

    def run(accumulate: Callable) -> Callable[[], AlphaSums]:
        def work() -> AlphaSums:
            sums = AlphaSums()
            accumulate(mirror, mirror, convs, x, sums)
            return sums

        return work

    loop, batched = run(accumulate_alphas_by_loop)(), run(accumulate_alphas)()  # warm up
    for conv in convs:
        expected, actual = loop.alphas()[conv.name], batched.alphas()[conv.name]
        # dead channels (alpha ~1e-12) differ in float32 round-off only: atol from the layer
        atol = 1e-7 * expected.max()
        np.testing.assert_allclose(actual, expected, 1e-4, atol, err_msg=f"{name} {conv.name}")
    return best_of([run(accumulate_alphas_by_loop), run(accumulate_alphas)], repeat)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    add_timing_options(parser)
    args = parser.parse_args(list(argv) or None)
    threads = apply_threads(args)
    print(f"alphas, loop against batched, {threads} thread(s), best of {args.repeat}:")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.model:
            loop, batched = measure(name, Path(folder), args.repeat)
            samples = MODELS[name][2]
            verdict = "meets" if loop[0] / batched[0] >= GOAL else "misses"
            print(
                f"{name:10s} {samples:3d} samples  wall: loop {loop[0]:7.3f}s batched "
                f"{batched[0]:7.3f}s ratio {loop[0] / batched[0]:5.1f}x | CPU: loop "
                f"{loop[1]:7.3f}s batched {batched[1]:7.3f}s ratio {loop[1] / batched[1]:5.1f}x "
                f"({verdict} the {GOAL:g}x goal)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
