"""Which whole-model allocation of GDWS kernels keeps the most robust accuracy?

For each rule of gdws.ALLOCATIONS (except auto) and each MAC reduction, this converts the
model and measures clean and robust accuracy (PGD l_inf through the torch mirror, verdicts
from onnxruntime) on held-out samples, all under one RobustnessCheck; the rules' inputs
(alphas, measured loss curves, one SVD per layer) come from a separate calibration split.
Prints a markdown table: robust accuracy (clean in brackets) per rule and target.

    .venv/bin/python benchmarks/allocation_rules.py models/robust_photos.onnx \\
        --dataset photos --calib photos:train --eps 4/255
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import load_model, save_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.gdws.allocation import ALLOCATIONS, USES_ALPHAS
from gdws_deploy.passes.gdws.decompose import SpectraCache
from gdws_deploy.pipeline.convert import convert
from gdws_deploy.robustness.alphas import compute_alphas
from gdws_deploy.robustness.attacks import make_attacks, parse_fraction
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.sensitivity import measure_loss_curves

RULES = [name for name in ALLOCATIONS if name != "auto"]


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dataset", default="photos", help="held-out split, measured on")
    parser.add_argument("--calib", default="photos:train", help="split the rules calibrate on")
    parser.add_argument("--limit", type=int, default=500, help="held-out samples")
    parser.add_argument("--calib-limit", type=int, default=500, help="calibration samples")
    parser.add_argument("--eps", default="4/255", help="l_inf budget (the model's training eps)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--reductions", default="1.5,2,3")
    parser.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args(list(argv) or None)
    reductions = [float(r) for r in args.reductions.split(",")]
    rules = args.rules.split(",")
    attacks = tuple(make_attacks("pgd-linf", {"linf": parse_fraction(args.eps)}, args.steps))
    test = RobustnessCheck(load_dataset(args.dataset, args.limit), attacks)
    calib = RobustnessCheck(load_dataset(args.calib, args.calib_limit), attacks)
    start = time.perf_counter()
    cache = SpectraCache()
    loaded = load_model(args.model)
    analyzed = analyze(loaded)  # the layers convert takes, analyzed once for both measures
    alphas = compute_alphas(analyzed, calib.dataset, attacks[0], batch_size=32).alphas
    loss_curves = measure_loss_curves(analyzed, calib, cache)
    calibration_s = time.perf_counter() - start
    original = test.evaluate(args.model)
    rows: Dict[str, List[str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for rule in rules:
            options = ConvertOptions(
                allocation=rule,
                spectra_cache=cache,
                alphas=alphas if rule in USES_ALPHAS else None,
                loss_curves=loss_curves if rule == "measured" else None,
                check_parity=False,
            )
            rows[rule] = []
            for target in reductions:
                model, report = convert(loaded, ConvertOptions.of(options, mac_reduction=target))
                path = save_model(model, Path(folder) / f"{rule}-{target:g}.onnx", like=loaded)
                result = test.evaluate(path)
                rows[rule].append(f"{result.robust_acc:.1%} ({result.clean_acc:.1%})")
                kernels = [layer.kernels for layer in report.layers]
                print(
                    f"{rule} {target:g}x: reached {report.reduction:.2f}x, kernels {kernels}, "
                    f"robust {result.robust_acc:.1%}",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"model {args.model}; robust accuracy (clean) on {len(test.dataset)} samples of "
        f"{args.dataset}, PGD-{args.steps} l_inf eps {args.eps}; rules calibrated on "
        f"{len(calib.dataset)} samples of {args.calib} ({calibration_s:.0f} s, "
        f"{cache.computed} SVDs in all)"
    )
    print()
    print("| rule | " + " | ".join(f"{t:g}x fewer MACs" for t in reductions) + " |")
    print("|---|" + "---|" * len(reductions))
    baseline = f"{original.robust_acc:.1%} ({original.clean_acc:.1%})"
    print("| original | " + " | ".join(baseline for _ in reductions) + " |")
    for rule, cells in rows.items():
        print(f"| {rule} | " + " | ".join(cells) + " |")
    print()
    for rule in rows:
        print(f"- {rule}: {ALLOCATIONS[rule].replace('||', '‖')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
