"""How much faster does a converted model run than its original, measured side by side?

For each architecture (random weights, CIFAR size) and MAC reduction this exports the
original, converts it, then times both with `gdws-deploy bench --compare`'s machinery:
onnxruntime on this CPU, trtexec's loop, the two models in alternating blocks in one
process. It prints the throughput ratio converted / original next to the MAC reduction.
On a Jetson, `jetson/bench.sh` does the same with TensorRT engines.

    .venv/bin/python benchmarks/bench_compare.py [--arch preactresnet18] [--reduction 2 4]
        [--batch 1 32] [--duration 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.options import ConvertOptions
from gdws_deploy.pipeline.convert import convert_file
from gdws_deploy.runtime.benchmark import BenchOptions, benchmark_pair, throughput_ratio
from gdws_deploy.runtime.runner import OrtRunner
from models.export import export_architecture


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["preactresnet18"])
    parser.add_argument("--reduction", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per model")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(list(argv) or None)
    print("throughput converted / original, onnxruntime CPU, interleaved in one process")
    print(f"{'model':16s} {'MACs':>6s} {'batch':>5s} {'original':>12s} {'converted':>12s} ratio")
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch:
            original = export_architecture(arch, Path(folder) / f"{arch}.onnx")
            for reduction in args.reduction:
                converted = Path(folder) / f"{arch}.{reduction:g}.gdws.onnx"
                options = ConvertOptions(mac_reduction=reduction, check_parity=False)
                report, _ = convert_file(original, converted, options)
                for batch in args.batch:
                    options = BenchOptions(duration_s=args.duration, batch=batch)
                    with OrtRunner(original, threads=args.threads) as base, OrtRunner(
                        converted, threads=args.threads
                    ) as fast:
                        before, after = benchmark_pair([base, fast], options, {}, args.rounds)
                    ratio = throughput_ratio(before.summary, after.summary)
                    print(
                        f"{arch:16s} {report.reduction:5.2f}x {batch:5d} "
                        f"{before.summary.images_per_s:9.1f}/s {after.summary.images_per_s:9.1f}/s "
                        f"{ratio:.2f}x"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
