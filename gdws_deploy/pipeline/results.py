"""What a sweep or a comparison measured: its points and the settings they were measured with.

Apart from the sweep and comparison that compute them, so that whatever shows a result
(the plot, the CLI's tables) reads these types without importing the computation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

from gdws_deploy.errors import GdwsError
from gdws_deploy.pipeline.operating_point import OperatingPoint


@dataclass(frozen=True)
class BenchSettings:
    """How throughput is timed: onnxruntime CPU, trtexec's loop, models interleaved.
    batch None: DEFAULT_BENCH_BATCH, or the model's own batch when its export fixes one."""

    batch: Optional[int] = None
    duration_s: float = 2.0
    rounds: int = 4
    threads: int = 0  # onnxruntime's default: one per core

    def validate(self) -> None:
        if (
            (self.batch is not None and self.batch < 1)
            or self.rounds < 1
            or self.threads < 0
            or not self.duration_s > 0
        ):
            raise GdwsError(
                "bench settings need batch >= 1, rounds >= 1, threads >= 0, duration > 0"
            )


@dataclass(frozen=True)
class MeasuredPoint:
    """One measured model (a sweep's or a comparison's row). kind: original, target (a
    --mac-reductions or --betas point) or max-drop (the --max-robust-drop answer);
    speedup: images/s over the original's, measured in the same run; size_bits: weight
    storage as ATMC counts it (ir.size.weight_bits); method: the pass that made it."""

    label: str
    kind: str
    model: str
    macs: int
    reduction: float
    parameters: int
    clean_acc: float
    robust_acc: float
    robust_ci95: Tuple[float, float]
    images_per_s: Optional[float] = None
    speedup: Optional[float] = None
    clean_ci95: Optional[Tuple[float, float]] = None
    size_bits: Optional[int] = None
    method: str = ""


@dataclass(frozen=True)
class SweepResult:
    """Every point (the original first), the settings they were measured with, and the
    --max-robust-drop search when one ran. allocation: the rule the targets used."""

    model: str
    allocation: str
    check: Dict[str, Any]
    calibration: Dict[str, Any]
    bench: BenchSettings
    points: Tuple[MeasuredPoint, ...]
    operating_point: Optional[OperatingPoint] = None

    @property
    def original(self) -> MeasuredPoint:
        return self.points[0]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "allocation": self.allocation,
            "check": self.check,
            "calibration": self.calibration,
            "bench": {"backend": "ort", "device": "cpu", **asdict(self.bench)},
            "points": [asdict(point) for point in self.points],
            "operating_point": self.operating_point.to_dict() if self.operating_point else None,
        }


@dataclass(frozen=True)
class CompareResult:
    """Every measured model (the original first) and the settings they were measured with."""

    model: str
    methods: Tuple[str, ...]
    mac_reductions: Tuple[float, ...]
    check: Dict[str, Any]
    calibration: Dict[str, Any]
    bench: BenchSettings
    points: Tuple[MeasuredPoint, ...]

    @property
    def original(self) -> MeasuredPoint:
        return self.points[0]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "methods": list(self.methods),
            "mac_reductions": list(self.mac_reductions),
            "check": self.check,
            "calibration": self.calibration,
            "bench": {"backend": "ort", "device": "cpu", **asdict(self.bench)},
            "points": [asdict(point) for point in self.points],
        }
