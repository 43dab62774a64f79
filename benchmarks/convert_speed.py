"""How close is `convert` to the least work a conversion must do?

For PreActResNet-18 and VGG-16 (CIFAR size, random weights) this times, in one run:
  floor:   onnx.load + one batched SVD per converted layer + onnx.save
  convert: gdws_deploy.pipeline.convert.convert_file (load, check, shape inference, SVDs,
           allocation, rewrite, verify, atomic save), parity check off
  parity:  the onnxruntime parity check, timed on its own
and prints convert / floor (goal: <= 1.5), best of --repeat runs each, in wall-clock time
(the goal) and in CPU time (all threads), which other jobs on a shared machine disturb less.

    .venv/bin/python benchmarks/convert_speed.py [--repeat 5] [--mac-reduction 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import List, Sequence, Tuple

import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import best_of, elapsed, print_verdict
from gdws_deploy.ir.parity import max_relative_deviation
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.gdws.decompose import ChannelSpectra
from gdws_deploy.pipeline.convert import convert_file
from models.export import export_architecture

GOAL = 1.5
ARCHITECTURES = ("preactresnet18", "vgg16")


def floor_work(source: Path, target: Path) -> None:
    """The least a conversion must do: read, one SVD per KxK conv after the first, write."""
    model = onnx.load(str(source))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    for node in convs[1:]:
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if weight.shape[2:] != (1, 1):
            ChannelSpectra.from_weight(weight)
    onnx.save(model, str(target))


def measure(arch: str, folder: Path, repeat: int, reduction: float) -> List[Tuple[float, float]]:
    """(wall, CPU) seconds of floor, convert and parity for one architecture."""
    source = export_architecture(arch, folder / f"{arch}.onnx")
    out = folder / f"{arch}.gdws.onnx"
    floor = partial(floor_work, source, folder / f"{arch}.floor.onnx")
    options = ConvertOptions(mac_reduction=reduction, check_parity=False)
    conversion = partial(convert_file, source, out, options)
    floor_s, convert_s = best_of([floor, conversion], repeat)
    parity = partial(max_relative_deviation, onnx.load(str(source)), onnx.load(str(out)))
    return [floor_s, convert_s, elapsed(parity)]


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mac-reduction", type=float, default=2.0)
    args = parser.parse_args(list(argv) or None)
    target = f"--mac-reduction {args.mac_reduction:g}"
    print(f"convert time against the floor, {target}, best of {args.repeat}:")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for arch in ARCHITECTURES:
            floor, converted, parity = measure(arch, Path(folder), args.repeat, args.mac_reduction)
            worst = max(worst, converted[0] / floor[0])
            print(
                f"{arch:16s} wall: floor {floor[0]:6.3f}s convert {converted[0]:6.3f}s "
                f"ratio {converted[0] / floor[0]:4.2f}x | CPU: floor {floor[1]:6.3f}s "
                f"convert {converted[1]:6.3f}s ratio {converted[1] / floor[1]:4.2f}x "
                f"| parity check alone {parity[0]:5.3f}s wall"
            )
    print_verdict(worst, GOAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
