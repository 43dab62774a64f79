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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import LoadedModel, load_model
from gdws_deploy.robustness.attacks import Attack, with_normalization, worst_case
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.device import resolve_device, verdict_providers
from gdws_deploy.robustness.mirror import OnnxMirror
from gdws_deploy.robustness.transfer import Transfer
from gdws_deploy.runtime.providers import Provider
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
    name: str,
    model: Union[str, Path, bytes],
    engine: Optional[Union[str, Path]] = None,
    providers: Optional[Sequence[Provider]] = None,
    threads: int = 0,
) -> Runner:
    """The (not yet activated) runner of backend `name` (speed.backends.BACKENDS) for this
    model (a path or serialized bytes) or engine; onnxruntime's on `providers` (default:
    the CPU) with `threads` intra-op threads (0: its default)."""
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
    if entry.threaded:
        return runner_class(source, providers=providers, threads=threads)
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


def paired_z(candidate: np.ndarray, base: np.ndarray) -> float:
    """How many standard errors `candidate`'s accuracy lies above `base`'s, from per-sample
    verdicts (bool arrays) on the same samples: the paired difference's mean over its
    standard error, so samples both get right or both get wrong add no noise. +-inf when
    the two differ on every sample the same way; 0 when they never differ."""
    difference = candidate.astype(np.float64) - base.astype(np.float64)
    mean = float(difference.mean()) if len(difference) else 0.0
    spread = float(difference.std(ddof=1)) if len(difference) > 1 else 0.0
    if spread == 0.0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / (spread / math.sqrt(len(difference)))


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
    # per attack in turn: name, robust_acc and robust_ci95 of the cumulative worst case
    # (the last: the transfer, when judged with one)
    per_attack: List[Dict] = field(default_factory=list)
    # the backend's accuracy on the examples crafted on `transfer_from` (None: not judged
    # so); robust_acc is then per sample the worse of those and the white-box attacks
    transfer_from: Optional[str] = None
    transfer_acc: Optional[float] = None
    # per sample (not serialized): what paired comparisons of two models on the same
    # samples need
    verdicts: Optional[Verdicts] = field(default=None, compare=False, repr=False)

    def robustbench(self) -> Dict:
        """The RobustBench-style summary: model, data, n, norm, eps, attacks (each with its
        name and settings), clean, robust and the cumulative robust accuracy after each."""
        budgets = {attack["norm"]: attack["eps"] for attack in self.attacks}
        return {
            "model": self.model,
            "data": self.dataset,
            "n": self.samples,
            "norm": ",".join(budgets) or None,
            "eps": next(iter(budgets.values())) if len(budgets) == 1 else budgets,
            "attacks": self.attacks,
            "clean": self.clean_acc,
            "robust": self.robust_acc,
            "per_attack": self.per_attack,
        }

    def to_dict(self) -> Dict:
        record = asdict(replace(self, verdicts=None))
        del record["verdicts"]
        record["robust_ci95"] = list(self.robust_ci95)
        record["disagreements"] = self.disagreements_clean + self.disagreements_adv
        return record


@dataclass(frozen=True)
class Verdicts:
    """Per sample, in data-set order (bool arrays): the backend right on the clean input
    and on the adversarial one (robust: the white-box attacks' and, judged with a
    Transfer, the transferred one's both), the mirror likewise, where mirror and backend
    disagree, and the backend right on the transferred input (the clean one without).
    Shards of an evaluation concatenate; a report is their sums."""

    clean: np.ndarray
    robust: np.ndarray
    mirror_clean: np.ndarray
    mirror_robust: np.ndarray
    disagree_clean: np.ndarray
    disagree_adv: np.ndarray
    transferred: np.ndarray
    # (samples, attacks): the backend right on the cumulative worst case after each attack
    robust_after: np.ndarray

    def __len__(self) -> int:
        return len(self.clean)

    @classmethod
    def concat(cls, parts: Sequence[Verdicts]) -> Verdicts:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def to_json(self) -> Dict[str, Union[str, List[str]]]:
        """Each array as a string of 0s and 1s (what a checkpoint stores), robust_after as
        one string per attack."""
        record: Dict[str, Union[str, List[str]]] = {
            f.name: _bits(getattr(self, f.name)) for f in fields(self)[:-1]
        }
        record["robust_after"] = [_bits(column) for column in self.robust_after.T]
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Union[str, List[str]]]) -> Verdicts:
        flags = [_from_bits(record[f.name]) for f in fields(cls)[:-1]]
        after = [_from_bits(column) for column in record["robust_after"]]
        return cls(*flags, np.stack(after, 1) if after else np.ones((len(flags[0]), 0), bool))


def _bits(flags: np.ndarray) -> str:
    return (flags.astype(np.uint8) + ord("0")).tobytes().decode()


def _from_bits(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8) == ord("1")


class Judge:
    """A model opened for verdicts: its backend runner (the verdicts) and its torch mirror
    on `device` (the attacks), normalized by mean/std where the model expects it. Used as
    a context manager, it holds the runner active."""

    def __init__(
        self,
        model: ModelSource,
        backend: str = "ort",
        engine: Optional[Union[str, Path]] = None,
        *,
        device: Union[str, torch.device] = "cpu",
        providers: Optional[Sequence[str]] = None,
        threads: int = 0,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        channels: int = 3,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        chosen = verdict_providers(self.device, providers) if backend == "ort" else None
        self.runner, loaded, self.name = _opened(model, backend, engine, chosen, threads)
        self.backend = backend
        self.mirror = OnnxMirror(loaded.model)
        self.target = with_normalization(self.mirror, mean, std, channels).to(self.device)
        fixed = _fixed_batch(self.mirror.input_shapes[0])
        self.predict = functools.partial(
            _backend_predict, self.runner, mean=mean, std=std, fixed=fixed
        )

    def __enter__(self) -> Judge:
        self.runner.activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.runner.deactivate()

    def check(self, dataset: Dataset) -> None:
        """GdwsError unless the model takes `dataset`'s images and labels."""
        with torch.no_grad():
            dataset.check_model(
                self.mirror.input_shapes[0],
                lambda x: self.target(torch.from_numpy(x).to(self.device)).shape[1],
            )

    def verdicts(
        self,
        x: np.ndarray,
        y: np.ndarray,
        sample_ids: np.ndarray,
        attacks: Sequence[Attack],
        batch_size: int,
        seed: int,
        progress: Optional[Progress] = None,
        transferred: Optional[np.ndarray] = None,
    ) -> Verdicts:
        """The verdicts on samples (x, y), whose indices in their data set are `sample_ids`
        (with `seed` they fix every random choice of the attacks, whatever the batching),
        attacked `batch_size` at a time; `transferred`: their examples crafted on another
        model (a Transfer's, aligned with x), judged too."""
        if batch_size < 1:
            raise GdwsError(f"batch size must be >= 1, got {batch_size}")
        parts = []
        for start in range(0, len(y), batch_size):
            window = slice(start, start + batch_size)
            moved = None if transferred is None else transferred[window]
            parts.append(
                self._batch(x[window], y[window], sample_ids[window], attacks, seed, moved)
            )
            if progress is not None:
                progress(min(start + batch_size, len(y)), len(y))
        return Verdicts.concat(parts)

    def _batch(
        self,
        x_batch: np.ndarray,
        y_batch: np.ndarray,
        sample_ids: np.ndarray,
        attacks: Sequence[Attack],
        seed: int,
        x_transferred: Optional[np.ndarray],
    ) -> Verdicts:
        """Only the samples the backend gets right are attacked (on the mirror)."""
        x = torch.from_numpy(x_batch).to(self.device)
        y = torch.from_numpy(y_batch).to(self.device)
        backend_clean = self.predict(x_batch)
        with torch.no_grad():
            mirror_clean = self.target(x).argmax(1).cpu().numpy()
        correct = np.flatnonzero(backend_clean == y_batch)
        x_after = [x.clone() for _ in attacks]
        if len(correct) and attacks:
            chosen = torch.from_numpy(correct).to(self.device)
            ids = torch.from_numpy(np.asarray(sample_ids)[correct])
            found = worst_case(self.target, x[chosen], y[chosen], attacks, ids, seed)
            for x_adv, after in zip(x_after, found.x_after):
                x_adv[chosen] = after
        x_adv = x_after[-1] if attacks else x
        backend_after = [self.predict(after.detach().cpu().numpy()) for after in x_after]
        backend_adv = backend_after[-1] if attacks else backend_clean
        with torch.no_grad():
            mirror_adv = self.target(x_adv).argmax(1).cpu().numpy()
        transferred = (
            backend_clean if x_transferred is None else self.predict(x_transferred)
        ) == y_batch
        return Verdicts(
            clean=backend_clean == y_batch,
            robust=(backend_adv == y_batch) & transferred,
            mirror_clean=mirror_clean == y_batch,
            mirror_robust=mirror_adv == y_batch,
            disagree_clean=mirror_clean != backend_clean,
            disagree_adv=mirror_adv != backend_adv,
            transferred=transferred,
            robust_after=np.array([after == y_batch for after in backend_after], bool).T.reshape(
                len(y_batch), len(attacks)
            ),
        )


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
    device: Union[str, torch.device] = "cpu",
    providers: Optional[Sequence[str]] = None,
    transfer: Optional[Transfer] = None,
) -> EvalReport:
    """Clean and robust accuracy of `model` on `dataset` under the worst of `attacks`
    and, per sample, of `transfer`'s examples (crafted on another model from `dataset`).

    model: a path, or a ModelProto / LoadedModel a caller already holds (used as it is).
    device: where the mirror attacks (a --device spec or torch.device); onnxruntime's
    verdicts run there too, on `providers` (runtime.providers.choose_providers).
    """
    start = time.perf_counter()
    judge = Judge(
        model,
        backend,
        engine,
        device=device,
        providers=providers,
        mean=mean,
        std=std,
        channels=dataset.x.shape[1],
    )
    judge.check(dataset)
    with judge:
        verdicts = judge.verdicts(
            dataset.x,
            dataset.y,
            np.arange(len(dataset)),
            attacks,
            batch_size,
            seed,
            progress,
            transferred=aligned(transfer, dataset),
        )
    return report_of(
        judge.name,
        backend,
        dataset,
        verdicts,
        attacks,
        mean,
        std,
        seed,
        time.perf_counter() - start,
        transfer,
    )


def aligned(transfer: Optional[Transfer], dataset: Dataset) -> Optional[np.ndarray]:
    """The transfer's inputs, checked to be one per sample of `dataset` (None: none)."""
    if transfer is None:
        return None
    if transfer.x.shape != dataset.x.shape:
        raise GdwsError(
            f"the examples transferred from {transfer.source} are {transfer.x.shape}, "
            f"not one per sample of {dataset.name} {dataset.x.shape}"
        )
    return transfer.x


def report_of(
    name: str,
    backend: str,
    dataset: Dataset,
    verdicts: Verdicts,
    attacks: Sequence[Attack],
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    seed: int,
    seconds: float,
    transfer: Optional[Transfer] = None,
) -> EvalReport:
    """The EvalReport of per-sample `verdicts` on `dataset` (judged with `transfer`)."""
    n = len(verdicts)
    robust = int(verdicts.robust.sum())
    survived = verdicts.robust_after.sum(0).tolist()
    names = [attack.name for attack in attacks]
    if transfer is not None:
        names.append(f"transfer from {transfer.source}")
        survived.append(robust)
    return EvalReport(
        model=name,
        backend=backend,
        dataset=dataset.name,
        samples=n,
        clean_acc=int(verdicts.clean.sum()) / n,
        robust_acc=robust / n,
        robust_ci95=wilson_interval(robust, n),
        mirror_clean_acc=int(verdicts.mirror_clean.sum()) / n,
        mirror_robust_acc=int(verdicts.mirror_robust.sum()) / n,
        disagreements_clean=int(verdicts.disagree_clean.sum()),
        disagreements_adv=int(verdicts.disagree_adv.sum()),
        attacks=[attack.to_dict() for attack in attacks],
        mean=list(mean) if mean else None,
        std=list(std) if std else None,
        seed=seed,
        seconds=seconds,
        per_attack=[
            {"name": name, "robust_acc": count / n, "robust_ci95": list(wilson_interval(count, n))}
            for name, count in zip(names, survived)
        ],
        transfer_from=None if transfer is None else transfer.source,
        transfer_acc=None if transfer is None else int(verdicts.transferred.sum()) / n,
        verdicts=verdicts,
    )


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
    model: ModelSource,
    backend: str,
    engine: Optional[Union[str, Path]],
    providers: Optional[Sequence[Provider]] = None,
    threads: int = 0,
) -> Tuple[Runner, LoadedModel, str]:
    """The backend's runner, the model and how the report names it. A path is checked
    against the backend first and read once; a model in memory is run from its file when it
    has one (external data stays outside the protobuf's 2 GB), else from its bytes."""
    if isinstance(model, (str, Path)):
        runner = open_backend(backend, model, engine, providers, threads)
        return runner, load_model(model), str(model)
    loaded = model if isinstance(model, LoadedModel) else LoadedModel(model)
    source = loaded.path if loaded.path is not None else loaded.model.SerializeToString()
    name = str(loaded.path) if loaded.path is not None else IN_MEMORY
    return open_backend(backend, source, engine, providers, threads), loaded, name
