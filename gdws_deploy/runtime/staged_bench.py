"""Time a staged multi-exit model against the single-pass model on real data, interleaved.

Which exits a batch takes depends on its images, so each query runs the next batch of the
data set (cycling) rather than one random batch: the time per batch then averages over the
data's exit pattern. Both models run in the same process in alternating blocks
(benchmark.interleaved_loops), timed on the host around the whole call (TensorRT included:
the staged runtime copies every stage's outputs back). Python 3.8, numpy only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.benchmark import BenchOptions, TimedTarget, interleaved_loops
from gdws_deploy.runtime.perf_summary import PerformanceSummary, summarize
from gdws_deploy.runtime.staged import StagedModel

# predict(batch) -> anything; what a timed query runs
Predict = Callable[[np.ndarray], object]


class DataCycle(TimedTarget):
    """Each query runs `predict` on the next batch of the data, timed with perf_counter."""

    def __init__(self, predict: Predict, batches: Sequence[np.ndarray]) -> None:
        self.predict, self.batches = predict, list(batches)
        self.batch = self.batches[0]
        self.next = 0
        self.origin = time.perf_counter()

    def start(self) -> None:
        self.origin = time.perf_counter()

    def query(self) -> Sequence[float]:
        batch = self.batches[self.next]
        self.next = (self.next + 1) % len(self.batches)
        begin = time.perf_counter()
        self.predict(batch)
        end = time.perf_counter()
        t0, t1 = (begin - self.origin) * 1000, (end - self.origin) * 1000
        return (t0, t1, t0, t0, t0, t1, t1, t1)


def data_batches(images: np.ndarray, batch: int) -> List[np.ndarray]:
    """The data in whole batches (the remainder is dropped; all of it when fewer)."""
    if len(images) == 0:
        raise GdwsError("benchmarking needs at least one sample")
    whole = max(1, len(images) // batch)
    return [images[i * batch : (i + 1) * batch] for i in range(whole)]


def time_on_data(
    predicts: Sequence[Predict],
    images: np.ndarray,
    batch: int,
    options: BenchOptions,
    rounds: int,
) -> List[PerformanceSummary]:
    """Each predict timed on the data's batches, all interleaved in one run."""
    options.validate()
    batches = data_batches(images, batch)
    targets = [DataCycle(predict, batches) for predict in predicts]
    traces = interleaved_loops(targets, options, rounds)
    size = len(batches[0])
    return [summarize(trace, size, options.percentiles, "cpu") for trace in traces]


@dataclass(frozen=True)
class ExitsBench:
    """The staged model against the single-pass one on one data set.

    exit_shares: share of samples leaving at each exit; expected_share: the staged model's
    expected MACs over the single-pass model's; accuracies on the data's labels.
    """

    staged: PerformanceSummary
    full: PerformanceSummary
    exit_shares: Tuple[float, ...]
    expected_macs: float
    full_macs: int
    staged_accuracy: float
    full_accuracy: float
    samples: int

    @property
    def expected_share(self) -> float:
        return self.expected_macs / self.full_macs

    @property
    def speedup(self) -> float:
        """Measured images/s of the staged model over the single-pass model's."""
        return (self.staged.images_per_s or 0.0) / (self.full.images_per_s or 1.0)


def bench_exits(
    staged: StagedModel,
    full: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    batch: int,
    options: BenchOptions,
    rounds: int,
) -> ExitsBench:
    """Exits, accuracy and expected MACs on the whole data, then both models timed.

    full: the single-pass model's predict (batch -> final logits).
    """
    parts = [staged.predict(b) for b in _chunks(images, batch)]
    logits = np.concatenate([p[0] for p in parts])
    exits = np.concatenate([p[1] for p in parts])
    full_logits = np.concatenate([full(b) for b in _chunks(images, batch)])
    summaries = time_on_data([staged.predict, full], images, batch, options, rounds)
    counts = np.bincount(exits, minlength=len(staged.policy.outputs))
    return ExitsBench(
        staged=summaries[0],
        full=summaries[1],
        exit_shares=tuple(float(c) for c in counts / len(exits)),
        expected_macs=staged.policy.expected_macs(exits),
        full_macs=staged.policy.full_macs,
        staged_accuracy=float(np.mean(logits.argmax(axis=1) == labels)),
        full_accuracy=float(np.mean(full_logits.argmax(axis=1) == labels)),
        samples=len(labels),
    )


def _chunks(images: np.ndarray, batch: int) -> List[np.ndarray]:
    return [images[i : i + batch] for i in range(0, len(images), batch)]
