"""One robustness measurement, fixed so that models measured with it compare.

A search or a sweep judges many converted models against their original: every one must
face the same attacks, with the same seed, on the same samples. A RobustnessCheck holds
those settings once and measures any model with the eval machinery (gdws_deploy.robustness.evaluate:
attacks on the torch mirror, verdicts from the backend). `transferred_from(original)` adds
the original's own adversarial examples to every verdict (gdws_deploy.robustness.transfer):
a converted model then counts as robust on a sample only when it survives both its own
attacks and the original's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks import Attack
from gdws_deploy.robustness.data import Dataset

if TYPE_CHECKING:
    from gdws_deploy.ir.graph import LoadedModel
    from gdws_deploy.robustness.shards import Sharding
    from gdws_deploy.robustness.transfer import Transfer

# Backends a search or sweep can judge on: each probe is a new ONNX file, and only
# onnxruntime runs one without an engine build per probe.
BACKENDS = ("ort",)


@dataclass(frozen=True)
class RobustnessCheck:
    """Samples, attacks and the settings that make two measurements comparable; where
    they run: `device` (the mirror's; onnxruntime's `providers` follow it) and
    `sharding` (None: in this process); `transfer`: examples crafted on another model,
    judged too (transferred_from)."""

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
    transfer: Optional[Transfer] = field(default=None, compare=False, repr=False)

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
            transfer=self.transfer,
        )

    def transferred_from(self, model: Union[str, Path, LoadedModel]) -> RobustnessCheck:
        """This check, judging every model also on `model`'s adversarial examples: this
        check's attacks on `model`'s mirror, crafted once here on every sample."""
        from gdws_deploy.robustness.transfer import transfer_from

        transfer = transfer_from(
            model,
            self.dataset,
            self.attacks,
            batch_size=self.batch_size,
            seed=self.seed,
            mean=self.mean,
            std=self.std,
            device=self.device,
        )
        return replace(self, transfer=transfer)

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
            "transfer_from": self.transfer.source if self.transfer else None,
        }


def with_transfer(
    check: RobustnessCheck, original: Union[str, Path, LoadedModel]
) -> RobustnessCheck:
    """`check` judging models converted from `original` also on its adversarial examples
    (RobustnessCheck.transferred_from), unless it already carries some."""
    return check if check.transfer is not None else check.transferred_from(original)
