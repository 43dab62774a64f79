"""Side-by-side timing for the benchmarks: alternate the contenders, keep each one's best;
for ONNX models, time them interleaved with the original at both ends as the control."""

from __future__ import annotations

import argparse
import time
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

from gdws_deploy.speed.backends import OrtBackend, Timing, time_models

# An A/A control further off than this (another tenant of the host) times the run again,
# up to CONTROL_ATTEMPTS times in all.
CONTROL_TOLERANCE = 1.05
CONTROL_ATTEMPTS = 3


def elapsed(work: Callable[[], object]) -> Tuple[float, float]:
    """(wall, CPU) seconds; CPU time (all threads) moves less when others load the machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def best_of(works: Sequence[Callable[[], object]], repeat: int) -> List[Tuple[float, float]]:
    """Best (wall, CPU) of each piece of work, run in turn `repeat` times so load hits all."""
    runs = [[elapsed(work) for work in works] for _ in range(repeat)]
    return [tuple(min(times) for times in zip(*column)) for column in zip(*runs)]


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's thread count from --threads; return the count in use."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def print_verdict(worst: float, goal: float) -> None:
    """The closing line of a ratio benchmark: the worst wall-clock ratio against its goal."""
    verdict = "meets" if worst <= goal else "misses"
    print(f"worst wall-clock ratio {worst:.2f}x {verdict} the {goal}x goal")


def time_with_control(
    backend: OrtBackend, models: Sequence[Tuple[bytes, tuple]], timing: Timing
) -> Tuple[List[float], float]:
    """time_models of `models`, whose first and last are the original: the ratio of those
    two (the control, 1.0 without noise) is the run's noise floor. Timed again, up to
    CONTROL_ATTEMPTS times, while the control reads off by more than CONTROL_TOLERANCE
    (another tenant of this host); the attempt with the best control is kept."""
    attempts = []
    for _ in range(CONTROL_ATTEMPTS):
        seconds = time_models(backend, models, timing)
        control = seconds[0] / seconds[-1]
        attempts.append((abs(np.log(control)), seconds, control))
        if attempts[-1][0] <= np.log(CONTROL_TOLERANCE):
            break
    _, seconds, control = min(attempts, key=lambda attempt: attempt[0])
    return seconds, control
