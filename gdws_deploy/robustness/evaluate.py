"""Robust accuracy of the deployed model: attacks from the mirror, verdicts from the runtime.

Gradients come from the torch mirror of the ONNX graph; every prediction that counts comes
from the backend that serves the model (onnxruntime here, a TensorRT engine on the Jetson),
so a converted model is judged by what actually runs. The report also gives the mirror's
own accuracy and how often the two disagree, which bounds what the mirror can be trusted
for. Only samples the backend classifies correctly are attacked; the others count as
broken either way.

The mirror runs any batch; a model exported with a fixed batch gets its backend fed in
chunks of exactly that batch, so --batch-size only sizes the attacks.
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import LoadedModel, load_model
from gdws_deploy.robustness.attacks import Attack, with_normalization, worst_case
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.mirror import OnnxMirror
from gdws_deploy.runtime.runner import Runner
from gdws_deploy.speed.backends import BACKENDS

# A model to evaluate: its file, or one already in memory (not read from disk again).
ModelSource = Union[str, Path, onnx.ModelProto, LoadedModel]
# How a report names a model that never was a file.
IN_MEMORY = "(in memory)"
Z_95 = 1.959963984540054
# progress(samples done, samples total)
Progress = Callable[[int, int], None]


def open_backend(
    name: str, model: Union[str, Path, bytes], engine: Optional[Union[str, Path]] = None
) -> Runner:
    """The (not yet activated) runner of backend `name` (speed.backends.BACKENDS) for this
    model (a path or serialized bytes) or engine."""
    if name not in BACKENDS:
        raise GdwsError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    entry = BACKENDS[name]
    source = model if entry.loads == "model" else engine
    if source is None:
        raise GdwsError(f"backend {name} runs a serialized engine: give --engine")
    module, attribute = entry.runner.split(":")
    try:
        runner_class = getattr(importlib.import_module(module), attribute)
    except ImportError as error:
        raise GdwsError(f"backend {name} is not available here: {error}") from error
    return runner_class(source)


def wilson_interval(successes: int, total: int, z: float = Z_95) -> Tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at 0% and 100%)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    scale = 1 + z * z / total
    center = (p + z * z / (2 * total)) / scale
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / scale
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class EvalReport:
    """Accuracies are fractions in [0, 1]; disagreements count samples where mirror and
    backend predict different classes (clean inputs, adversarial inputs)."""

    model: str
    backend: str
    dataset: str
    samples: int
    clean_acc: float
    robust_acc: float
    robust_ci95: Tuple[float, float]
    mirror_clean_acc: float
    mirror_robust_acc: float
    disagreements_clean: int
    disagreements_adv: int
    attacks: List[Dict]
    mean: Optional[List[float]]
    std: Optional[List[float]]
    seed: int
    seconds: float

    def to_dict(self) -> Dict:
        record = asdict(self)
        record["robust_ci95"] = list(self.robust_ci95)
        record["disagreements"] = self.disagreements_clean + self.disagreements_adv
        return record


@dataclass
class _Counts:
    clean: int = 0
    robust: int = 0
    mirror_clean: int = 0
    mirror_robust: int = 0
    disagree_clean: int = 0
    disagree_adv: int = 0
    seen: int = 0


def evaluate(
    model: ModelSource,
    dataset: Dataset,
    attacks: Sequence[Attack],
    backend: str = "ort",
    engine: Optional[Union[str, Path]] = None,
    batch_size: int = 128,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> EvalReport:
    """Clean and robust accuracy of `model` on `dataset` under the worst of `attacks`.

    model: a path, or a ModelProto / LoadedModel a caller already holds (used as it is).
    """
    start = time.perf_counter()
    runner, loaded, name = _opened(model, backend, engine)
    mirror = OnnxMirror(loaded.model)
    target = with_normalization(mirror, mean, std, dataset.x.shape[1])
    with torch.no_grad():
        dataset.check_model(mirror.input_shapes[0], lambda x: target(torch.from_numpy(x)).shape[1])
    fixed = _fixed_batch(mirror.input_shapes[0])
    counts = _Counts()
    predict = functools.partial(_backend_predict, runner, mean=mean, std=std, fixed=fixed)
    with runner:
        for x_batch, y_batch in dataset.batches(batch_size):
            ids = torch.arange(counts.seen, counts.seen + len(y_batch))
            _evaluate_batch(predict, target, attacks, x_batch, y_batch, ids, seed, counts)
            if progress is not None:
                progress(counts.seen, len(dataset))
    n = counts.seen
    return EvalReport(
        model=name,
        backend=backend,
        dataset=dataset.name,
        samples=n,
        clean_acc=counts.clean / n,
        robust_acc=counts.robust / n,
        robust_ci95=wilson_interval(counts.robust, n),
        mirror_clean_acc=counts.mirror_clean / n,
        mirror_robust_acc=counts.mirror_robust / n,
        disagreements_clean=counts.disagree_clean,
        disagreements_adv=counts.disagree_adv,
        attacks=[attack.to_dict() for attack in attacks],
        mean=list(mean) if mean else None,
        std=list(std) if std else None,
        seed=seed,
        seconds=time.perf_counter() - start,
    )


def _evaluate_batch(
    predict: Callable[[np.ndarray], np.ndarray],
    target: Callable[[torch.Tensor], torch.Tensor],
    attacks: Sequence[Attack],
    x_batch: np.ndarray,
    y_batch: np.ndarray,
    sample_ids: torch.Tensor,
    seed: int,
    counts: _Counts,
) -> None:
    """predict: images -> the backend's classes; target: images -> the mirror's logits;
    sample_ids: the samples' indices in the data set, which with `seed` fix the attacks'
    random choices (a verdict does not depend on the batching)."""
    x, y = torch.from_numpy(x_batch), torch.from_numpy(y_batch)
    backend_clean = predict(x_batch)
    with torch.no_grad():
        mirror_clean = target(x).argmax(1).numpy()
    correct = np.flatnonzero(backend_clean == y_batch)
    x_adv = x.clone()
    if len(correct) and attacks:
        chosen = torch.from_numpy(correct)
        x_adv[chosen] = worst_case(
            target, x[chosen], y[chosen], attacks, sample_ids[chosen], seed
        ).x_adv
    backend_adv = predict(x_adv.numpy())
    with torch.no_grad():
        mirror_adv = target(x_adv).argmax(1).numpy()
    counts.clean += int((backend_clean == y_batch).sum())
    counts.robust += int((backend_adv == y_batch).sum())
    counts.mirror_clean += int((mirror_clean == y_batch).sum())
    counts.mirror_robust += int((mirror_adv == y_batch).sum())
    counts.disagree_clean += int((mirror_clean != backend_clean).sum())
    counts.disagree_adv += int((mirror_adv != backend_adv).sum())
    counts.seen += len(y_batch)


def _backend_predict(
    runner: Runner,
    x: np.ndarray,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    fixed: Optional[int] = None,
) -> np.ndarray:
    """The backend's classes for images `x` (N, C, H, W), normalized here when asked; fed
    in chunks of `fixed` samples (the last one zero-padded) for a fixed-batch model."""
    if mean or std:
        shape = (1, -1, 1, 1)
        x = (x - np.reshape(mean or [0.0], shape)) / np.reshape(std or [1.0], shape)
    x = x.astype(np.float32, copy=False)  # the runners' input; each casts to its model's type
    if fixed is None or len(x) == fixed:
        return np.asarray(runner.infer(x)).argmax(1)
    padded = np.concatenate([x, np.zeros((-len(x) % fixed, *x.shape[1:]), x.dtype)])
    chunks = padded.reshape(-1, fixed, *x.shape[1:])
    return np.concatenate([np.asarray(runner.infer(chunk)).argmax(1) for chunk in chunks])[: len(x)]


def _fixed_batch(input_shape: Sequence) -> Optional[int]:
    """The batch a model exported with a fixed one takes (None: any)."""
    fixed = input_shape[0] if input_shape else None
    return fixed if isinstance(fixed, int) and fixed > 0 else None


def _opened(
    model: ModelSource, backend: str, engine: Optional[Union[str, Path]]
) -> Tuple[Runner, LoadedModel, str]:
    """The backend's runner, the model and how the report names it. A path is checked
    against the backend first and read once; a model in memory is run from its file when it
    has one (external data stays outside the protobuf's 2 GB), else from its bytes."""
    if isinstance(model, (str, Path)):
        runner = open_backend(backend, model, engine)
        return runner, load_model(model), str(model)
    loaded = model if isinstance(model, LoadedModel) else LoadedModel(model)
    source = loaded.path if loaded.path is not None else loaded.model.SerializeToString()
    name = str(loaded.path) if loaded.path is not None else IN_MEMORY
    return open_backend(backend, source, engine), loaded, name
