"""One robustness measurement, fixed so that models measured with it compare.

A search or a sweep judges many converted models against their original: every one must
face the same attacks, with the same seed, on the same samples. A RobustnessCheck holds
those settings once and measures any model with the eval machinery (gdws_deploy.robustness.evaluate:
attacks on the torch mirror, verdicts from the backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks import Attack
from gdws_deploy.robustness.data import Dataset

if TYPE_CHECKING:
    from gdws_deploy.robustness.shards import Sharding

# Backends a search or sweep can judge on: each probe is a new ONNX file, and only
# onnxruntime runs one without an engine build per probe.
BACKENDS = ("ort",)


@dataclass(frozen=True)
class RobustnessCheck:
    """Samples, attacks and the settings that make two measurements comparable; where
    they run: `device` (the mirror's; onnxruntime's `providers` follow it) and
    `sharding` (None: in this process)."""

    dataset: Dataset
    attacks: Tuple[Attack, ...]
    backend: str = "ort"
    batch_size: int = 128
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    seed: int = 0
    device: str = "cpu"
    providers: Optional[Tuple[str, ...]] = None
    sharding: Optional[Sharding] = None

    def __post_init__(self) -> None:
        if not self.attacks:
            raise GdwsError("a robustness check needs at least one attack")
        if self.backend not in BACKENDS:
            raise GdwsError(
                f"backend {self.backend!r} cannot judge converted models here; "
                f"choose from {', '.join(BACKENDS)}"
            )

    def evaluate(self, model: Union[str, Path], progress=None):
        """The model's EvalReport (clean and robust accuracy) under this check."""
        from gdws_deploy.robustness.evaluate import evaluate
        from gdws_deploy.robustness.shards import evaluate_sharded

        run = (
            evaluate if self.sharding is None else partial(evaluate_sharded, sharding=self.sharding)
        )
        return run(
            model,
            self.dataset,
            self.attacks,
            backend=self.backend,
            batch_size=self.batch_size,
            mean=self.mean,
            std=self.std,
            seed=self.seed,
            progress=progress,
            device=self.device,
            providers=self.providers,
        )

    def describe(self) -> Dict:
        """JSON-ready settings, for reports that must say what was measured."""
        return {
            "dataset": self.dataset.name,
            "samples": len(self.dataset),
            "attacks": [attack.to_dict() for attack in self.attacks],
            "backend": self.backend,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "seed": self.seed,
        }
