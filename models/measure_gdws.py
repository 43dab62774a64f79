"""Clean and robust accuracy of a trained model after GDWS conversion at several MAC targets.

Reads the JSON record train_robust.py wrote beside the model for the dataset and the exact
attack, converts with gdws_deploy.pipeline.convert (whole-model MAC target, --allocation rule),
and measures every converted model with gdws_deploy.robustness.evaluate, so each row faces the same
attack as the recorded original. Prints a markdown table; `-o` also writes JSON.

    python models/measure_gdws.py models/robust_photos.onnx --mac-reductions 1.5,2,3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.gdws.allocation import ALLOCATIONS
from gdws_deploy.pipeline.convert import convert_file
from gdws_deploy.robustness.attacks import Attack
from gdws_deploy.robustness.evaluate import evaluate
from models.train_robust import load_split, run_script


def measure(
    model_path: Path, reductions: Sequence[float], allocation: str = "auto"
) -> List[Dict[str, object]]:
    """One row for the original and one per MAC reduction target (gdws.ALLOCATIONS rule)."""
    record_path = model_path.with_suffix(".json")
    if not record_path.is_file():
        raise GdwsError(f"{record_path} not found: measure_gdws needs train_robust.py's record")
    recipe = json.loads(record_path.read_text())["recipe"]
    torch.set_num_threads(recipe["threads"])
    attacks = [Attack(**recipe["eval_attack"])]
    data = load_split(recipe["dataset"], "test")
    rows = [_row("original", 1.0, evaluate(model_path, data, attacks, seed=recipe["seed"]))]
    with tempfile.TemporaryDirectory() as folder:
        for target in reductions:
            converted = Path(folder) / f"gdws_{target:g}x.onnx"
            options = ConvertOptions(mac_reduction=target, allocation=allocation)
            report, _ = convert_file(model_path, converted, options)
            scores = evaluate(converted, data, attacks, seed=recipe["seed"])
            rows.append(_row(f"{target:g}x", report.reduction, scores))
    return rows


def _row(target: str, reduction: float, report) -> Dict[str, object]:
    return {
        "target": target,
        "mac_reduction": round(reduction, 3),
        "clean": report.clean_acc,
        "robust": report.robust_acc,
        "robust_ci95": list(report.robust_ci95),
        "samples": report.samples,
    }


def markdown(rows: Sequence[Dict[str, object]]) -> str:
    lines = ["| target | MAC reduction | clean | robust (95% CI) |", "|---|---|---|---|"]
    for row in rows:
        low, high = row["robust_ci95"]
        lines.append(
            f"| {row['target']} | {row['mac_reduction']:.2f}x | {row['clean']:.1%} "
            f"| {row['robust']:.1%} ({low:.1%}-{high:.1%}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="ONNX model with its train_robust.py JSON")
    parser.add_argument("--mac-reductions", default="1.5,2,3")
    parser.add_argument("--allocation", default="auto", choices=sorted(ALLOCATIONS))
    parser.add_argument("-o", "--output", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(list(argv) or None)
    if args.output is not None:
        check_output_path(args.output, args.model)
    reductions = [float(r) for r in args.mac_reductions.split(",")]
    rows = measure(args.model, reductions, args.allocation)
    print(markdown(rows))
    if args.output is not None:
        with atomic_open(args.output) as handle:
            json.dump(rows, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
