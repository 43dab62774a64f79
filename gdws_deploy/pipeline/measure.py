"""Measure a set of models side by side: accuracy under one RobustnessCheck, weights and
their storage, and throughput with every model timed interleaved in one run.

What sweep and compare share: they differ in which models they make, not in how those
are measured, so two of their rows are comparable whichever verb wrote them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Sequence

import numpy as np
import onnx

from gdws_deploy.ir.graph import load_model
from gdws_deploy.ir.size import weight_bits
from gdws_deploy.pipeline.results import BenchSettings, MeasuredPoint
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.evaluate import wilson_interval

# progress(what is being done now)
Progress = Callable[[str], None]
_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)


@dataclass(frozen=True)
class ModelToMeasure:
    """A model file and what the tables call it. kind: original, target, max-drop (sweep)
    or a method's row (compare); method: the pass that made it ("" for the original)."""

    path: Path
    label: str
    kind: str
    macs: int
    reduction: float
    method: str = ""


def count_parameters(model: onnx.ModelProto) -> int:
    """Floating-point weights stored in the graph (initializers), e.g. conv weights."""
    return int(
        sum(
            np.prod(t.dims, dtype=np.int64)
            for t in model.graph.initializer
            if t.data_type in _FLOAT_TYPES
        )
    )


def measure_models(
    models: Sequence[ModelToMeasure],
    measured: Sequence[Any],
    check: RobustnessCheck,
    bench: BenchSettings,
    say: Progress,
) -> List[MeasuredPoint]:
    """Accuracy of each model under `check` (`measured`: the first models' EvalReports,
    already taken), then all of them timed interleaved; speed-ups are over the first."""
    from gdws_deploy.runtime.benchmark import BenchOptions, benchmark_pair, throughput_ratio
    from gdws_deploy.runtime.runner import OrtRunner

    reports = list(measured)
    for entry in models[len(reports) :]:
        say(f"attacking {entry.label} ({len(check.dataset)} samples)")
        reports.append(check.evaluate(entry.path))
    say(f"timing {len(models)} models interleaved (batch {bench.batch})")
    options = BenchOptions(duration_s=bench.duration_s, batch=bench.batch)
    with contextlib.ExitStack() as stack:
        runners = [stack.enter_context(OrtRunner(m.path, threads=bench.threads)) for m in models]
        timings = benchmark_pair(runners, options, {}, bench.rounds)
    base = timings[0].summary
    points = []
    for entry, report, timing in zip(models, reports, timings):
        stored = load_model(entry.path).model
        clean = round(report.clean_acc * report.samples)
        points.append(
            MeasuredPoint(
                label=entry.label,
                kind=entry.kind,
                model=str(entry.path),
                macs=entry.macs,
                reduction=entry.reduction,
                parameters=count_parameters(stored),
                clean_acc=report.clean_acc,
                robust_acc=report.robust_acc,
                robust_ci95=tuple(report.robust_ci95),
                images_per_s=timing.summary.images_per_s,
                speedup=throughput_ratio(base, timing.summary),
                clean_ci95=wilson_interval(clean, report.samples),
                size_bits=weight_bits(stored),
                method=entry.method,
            )
        )
    return points
