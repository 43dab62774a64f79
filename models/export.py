"""Export a torch CNN to ONNX the way robust-model checkpoints are usually exported.

Legacy TorchScript exporter, opset 17, dynamic batch: clean Conv/BN/Relu graphs that
onnxruntime, TensorRT 8.5 and our mirror all read. Usable as a script:

    python models/export.py preactresnet18 -o preact.onnx [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence, Tuple, Union

import torch
from torch import nn

from gdws_deploy.atomic import atomic_path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.networks import ARCHITECTURES, randomize_batchnorm

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(
    module: nn.Module,
    path: Union[str, Path],
    input_shape: Tuple[int, ...] = (1, 3, 32, 32),
    opset: int = 17,
    output_names: Sequence[str] = (OUTPUT_NAME,),
) -> Path:
    """Write `module` (in eval mode) to `path` atomically, batch dimension dynamic;
    output_names name its outputs in order (a multi-exit model returns several)."""
    module = module.eval()
    example = torch.zeros(input_shape)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes=dynamic,
        )
    return Path(path)


def export_architecture(name: str, path: Union[str, Path], seed: int = 0) -> Path:
    """Export one of the paper's networks with seeded random weights and BN statistics."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(ARCHITECTURES[name](), seed)
    return export_onnx(model, path)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(ARCHITECTURES))
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) or None)
    print(export_architecture(args.arch, args.output, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
