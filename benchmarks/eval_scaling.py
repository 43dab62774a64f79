"""How fast does `eval` attack: one process against local Ray workers, and GPU against CPU.

The rate is sample-steps per second: samples attacked x PGD steps, over the wall-clock
time of the whole evaluation (mirror build, verdicts and Ray's task traffic included; a
Ray instance is started first, its start-up reported apart). A CIFAR-size network with
seeded random weights (BatchNorm statistics randomized) is judged on random images
labelled with its own clean predictions, so every sample is attacked for every step.

    .venv/bin/python benchmarks/eval_scaling.py                     # 1 process vs 2 workers
    .venv/bin/python benchmarks/eval_scaling.py --gpu --batch 256   # + GPU vs CPU

Goals: 2 workers >= 1.6x one process on a 2-core machine; the GPU >= 50x the CPU on
PreActResNet-18 at batch 256. The last line scales the measured rates to the full standard
protocol (AutoAttack's: APGD-CE, APGD-T, FAB-T, Square) on 10,000 CIFAR-size samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.robustness.attacks import make_attacks
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.evaluate import EvalReport, evaluate
from gdws_deploy.robustness.shards import Sharding, evaluate_sharded
from gdws_deploy.runtime.runner import OrtRunner
from models.export import export_onnx
from models.networks import ARCHITECTURES, randomize_batchnorm

WORKER_GOAL, GPU_GOAL = 1.6, 50.0
# Gradient-step equivalents per sample of AutoAttack's standard version, for a sample that
# survives every attack (broken samples stop early, so this bounds the work from above):
# APGD-CE 100 steps, APGD-T 9 targets x 100, FAB-T 9 targets x 100, Square 5000 queries
# at about a third of a gradient step each (forward only).
STANDARD_STEPS = 100 + 9 * 100 + 9 * 100 + 5000 // 3
STANDARD_SAMPLES = 10_000


def model_and_data(arch: str, folder: Path, samples: int) -> tuple:
    """The ONNX model and random CIFAR-size images labelled with its own predictions."""
    torch.manual_seed(0)
    model = export_onnx(randomize_batchnorm(ARCHITECTURES[arch]()), folder / f"{arch}.onnx")
    x = np.random.default_rng(1).random((samples, 3, 32, 32), dtype=np.float32)
    with OrtRunner(model) as runner:
        y = np.concatenate([runner.infer(x[i : i + 256]).argmax(1) for i in range(0, samples, 256)])
    return model, Dataset("random-cifar-size", x, y.astype(np.int64))


def rate(run: Callable[[], EvalReport], samples: int, steps: int) -> float:
    """Sample-steps per second of one evaluation."""
    started = time.perf_counter()
    report = run()
    seconds = time.perf_counter() - started
    assert report.clean_acc == 1.0, "every sample must be attacked"
    return samples * steps / seconds


def one_thread(run: Callable[[], EvalReport]) -> EvalReport:
    """`run` with torch on one intra-op thread (what each Ray worker gets)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def best_rates(runs: Dict[str, Callable[[], EvalReport]], samples: int, steps: int, repeat: int):
    """The best rate of each run over `repeat` rounds, the runs taking turns (so that load
    from other processes on a shared machine falls on all alike)."""
    rates: Dict[str, float] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            rates[name] = max(rates.get(name, 0.0), rate(run, samples, steps))
    return rates


def hours(sample_steps_per_s: float) -> str:
    return f"{STANDARD_SAMPLES * STANDARD_STEPS / sample_steps_per_s / 3600:.1f} h"


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="preactresnet18", choices=sorted(ARCHITECTURES))
    parser.add_argument("--samples", type=int, default=64, help="CPU runs' samples")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="also time the GPU against the CPU")
    parser.add_argument("--gpu-samples", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2, help="rounds, best of each kept")
    args = parser.parse_args(list(argv) or None)
    attacks = make_attacks("pgd-linf", {"*": 8 / 255}, steps=args.steps)
    rates: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        model, data = model_and_data(args.arch, Path(folder), max(args.samples, args.gpu_samples))
        cpu_data = Dataset(data.name, data.x[: args.samples], data.y[: args.samples])
        common = dict(batch_size=args.batch, seed=0)
        evaluate(model, Dataset(data.name, data.x[:2], data.y[:2]), attacks, **common)  # warm-up
        runs = {
            "1 process": lambda: evaluate(model, cpu_data, attacks, **common),
            "1 process, 1 thread": lambda: one_thread(
                lambda: evaluate(model, cpu_data, attacks, **common)
            ),
        }
        if args.workers:
            import ray

            started = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            print(f"Ray start-up: {time.perf_counter() - started:.1f} s (not counted)")
            sharding = Sharding(workers=args.workers)
            runs[f"{args.workers} Ray workers"] = lambda: evaluate_sharded(
                model, cpu_data, attacks, sharding=sharding, **common
            )
        rates.update(best_rates(runs, args.samples, args.steps, args.repeat))
        if args.workers:
            ray.shutdown()
        print(
            f"{args.arch}, PGD-{args.steps} l_inf, batch {args.batch}, {args.samples} samples, "
            f"best of {args.repeat}; {torch.get_num_threads()} torch threads in one process; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        for name, value in rates.items():
            ratio = value / rates["1 process"]
            verdict = (
                f" (goal >= {WORKER_GOAL}x: " + ("met)" if ratio >= WORKER_GOAL else "NOT met)")
                if "workers" in name
                else ""
            )
            print(f"{name}: {value:.1f} sample-steps/s = {ratio:.2f}x one process{verdict}")
        if args.gpu:
            if not torch.cuda.is_available():
                print("--gpu: torch sees no CUDA GPU here", file=sys.stderr)
                return 2
            gpu = dict(batch_size=args.batch, seed=0, device="cuda")
            evaluate(model, Dataset(data.name, data.x[:8], data.y[:8]), attacks, **gpu)  # warm-up
            rates["GPU"] = rate(
                lambda: evaluate(model, data, attacks, **gpu), len(data), args.steps
            )
            ratio = rates["GPU"] / rates["1 process"]
            print(
                f"GPU ({torch.cuda.get_device_name()}), {len(data)} samples: "
                f"{rates['GPU']:.1f} sample-steps/s = {ratio:.1f}x the CPU "
                f"(goal >= {GPU_GOAL}x: {'met' if ratio >= GPU_GOAL else 'NOT met'})"
            )
    print(
        f"Full standard protocol on {STANDARD_SAMPLES} samples (<= {STANDARD_STEPS} "
        "gradient-step equivalents each): "
        + ", ".join(f"{name} {hours(value)}" for name, value in rates.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
