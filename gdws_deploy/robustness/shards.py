"""An evaluation split into shards of samples: on local Ray workers, a Ray cluster, or in
this process, with finished shards checkpointed so an interrupted run resumes.

Shards are contiguous runs of sample indices, one batch each by default, and every
sample's attack is seeded by its index in the data set (gdws_deploy.robustness.attacks),
so the per-sample verdicts are the same whatever the number of workers or the order in
which shards finish. A worker that dies mid-shard costs a retry of that shard (Ray's task
retries); each worker process opens the model once and keeps it for the shards that follow.

A checkpoint (--resume FILE) is JSON: the run's fingerprint (model and data digests,
attacks, seed, batching; a different run refuses the file) and the verdicts of each
finished shard, rewritten atomically after every shard. Killed at any point, the file is
the last complete state; rerun with it, no finished shard is computed again.

Ray is optional (pip install gdws-deploy[ray]); without it everything but --workers and
--ray-address works as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch

from gdws_deploy.atomic import atomic_open
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import LoadedModel, load_model
from gdws_deploy.robustness.attacks import Attack
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.device import resolve_device
from gdws_deploy.robustness.evaluate import (
    IN_MEMORY,
    EvalReport,
    Judge,
    ModelSource,
    Progress,
    Verdicts,
    aligned,
    report_of,
)
from gdws_deploy.robustness.transfer import Transfer
from gdws_deploy.runtime.providers import parse_device

CHECKPOINT_FORMAT = "gdws-deploy eval checkpoint 2"
RAY_HINT = "pip install gdws-deploy[ray]"
# Ray retries a shard whose worker died this many times before the run fails.
SHARD_RETRIES = 3
# (start, stop) sample indices of one shard
Span = Tuple[int, int]


@dataclass(frozen=True)
class Sharding:
    """How an evaluation is spread: `workers` local Ray workers, or the Ray cluster at
    `address` (its workers), or this process (neither); `resume`: a checkpoint file;
    `shard_size`: samples per shard (None: the batch size)."""

    workers: int = 0
    address: Optional[str] = None
    resume: Optional[Path] = None
    shard_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.workers < 0 or (self.shard_size is not None and self.shard_size < 1):
            raise GdwsError("workers must be >= 0 and shard_size >= 1")

    @property
    def on_ray(self) -> bool:
        return self.workers > 0 or self.address is not None


@dataclass(frozen=True)
class _Job:
    """What every shard of one evaluation shares; sent to each Ray worker once."""

    model: bytes
    digest: str
    backend: str
    attacks: Tuple[Attack, ...]
    batch_size: int
    seed: int
    mean: Optional[Tuple[float, ...]]
    std: Optional[Tuple[float, ...]]
    device: str
    providers: Optional[Tuple[str, ...]]
    threads: int

    def judge(self, channels: int) -> Judge:
        """The model opened as this job says (not yet active)."""
        return Judge(
            LoadedModel(onnx.load_from_string(self.model)),
            self.backend,
            device=self.device,
            providers=self.providers,
            threads=self.threads,
            mean=self.mean,
            std=self.std,
            channels=channels,
        )


def evaluate_sharded(
    model: ModelSource,
    dataset: Dataset,
    attacks: Sequence[Attack],
    backend: str = "ort",
    batch_size: int = 128,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    seed: int = 0,
    progress: Optional[Progress] = None,
    device: Union[str, torch.device] = "cpu",
    providers: Optional[Sequence[str]] = None,
    transfer: Optional[Transfer] = None,
    *,
    sharding: Sharding,
) -> EvalReport:
    """evaluate() spread as `sharding` says; the same report (but its seconds) as one
    process gives. progress(samples done, total) counts finished shards, across workers."""
    start = time.perf_counter()
    if backend != "ort":
        raise GdwsError(
            "sharded evaluation (--workers, --ray-address, --resume) needs --backend ort"
        )
    name, model_bytes = _serialized(model)
    spec = str(device) if isinstance(device, torch.device) else device
    job = _Job(
        model=model_bytes,
        digest=hashlib.sha256(model_bytes).hexdigest(),
        backend=backend,
        attacks=tuple(attacks),
        batch_size=batch_size,
        seed=seed,
        mean=tuple(mean) if mean else None,
        std=tuple(std) if std else None,
        device=_worker_device(spec, sharding),
        providers=tuple(providers) if providers else None,
        threads=1 if sharding.on_ray else 0,
    )
    transferred = aligned(transfer, dataset)
    local = replace(job, device="cpu", threads=0) if sharding.on_ray else job
    judge = local.judge(dataset.x.shape[1])
    judge.check(dataset)  # a data set the model cannot take fails here, before any worker
    size = sharding.shard_size or batch_size
    spans = [(first, min(first + size, len(dataset))) for first in range(0, len(dataset), size)]
    run = _fingerprint(job, dataset, size, transferred)
    checkpoint = Checkpoint(sharding.resume, run, len(spans))
    done = dict(checkpoint.shards)
    todo = [index for index in range(len(spans)) if index not in done]
    finished = sum(spans[index][1] - spans[index][0] for index in done)
    if progress is not None:
        progress(finished, len(dataset))
    if sharding.on_ray:
        results = _on_ray(job, dataset, transferred, spans, todo, sharding)
    else:
        results = _here(judge, job, dataset, transferred, spans, todo)
    for index, verdicts in results:
        done[index] = verdicts
        checkpoint.save(index, verdicts)
        finished += len(verdicts)
        if progress is not None:
            progress(finished, len(dataset))
    verdicts = Verdicts.concat([done[index] for index in range(len(spans))])
    seconds = time.perf_counter() - start
    return report_of(name, backend, dataset, verdicts, attacks, mean, std, seed, seconds, transfer)


def _serialized(model: ModelSource) -> Tuple[str, bytes]:
    """How the report names the model, and its bytes (what workers load)."""
    if isinstance(model, (str, Path)):
        return str(model), load_model(model).model.SerializeToString()
    loaded = model if isinstance(model, LoadedModel) else LoadedModel(model)
    name = str(loaded.path) if loaded.path is not None else IN_MEMORY
    return name, loaded.model.SerializeToString()


def _worker_device(spec: str, sharding: Sharding) -> str:
    """The device spec workers resolve. In this process it is resolved now (a bad one
    fails before any work); local Ray workers get the kind this machine resolves it to
    (Ray gives each GPU task its own GPU as cuda:0); a cluster's workers resolve it
    themselves, on their own hardware."""
    if sharding.address is not None:
        parse_device(spec)
        return spec
    resolved = resolve_device(spec)
    return resolved.type if sharding.on_ray else str(resolved)


def _fingerprint(
    job: _Job, dataset: Dataset, shard_size: int, transferred: Optional[np.ndarray]
) -> Dict:
    """What makes two runs' shards interchangeable (not the device or the workers)."""
    data = hashlib.sha256(np.ascontiguousarray(dataset.x).tobytes())
    data.update(np.ascontiguousarray(dataset.y).tobytes())
    moved = None if transferred is None else np.ascontiguousarray(transferred).tobytes()
    return {
        "model_sha256": job.digest,
        "dataset": dataset.name,
        "samples": len(dataset),
        "data_sha256": data.hexdigest(),
        "attacks": [attack.to_dict() for attack in job.attacks],
        "backend": job.backend,
        "mean": list(job.mean) if job.mean else None,
        "std": list(job.std) if job.std else None,
        "seed": job.seed,
        "batch_size": job.batch_size,
        "shard_size": shard_size,
        "transfer_sha256": None if moved is None else hashlib.sha256(moved).hexdigest(),
    }


class Checkpoint:
    """The finished shards of one run in a JSON file (none: nothing is kept)."""

    def __init__(self, path: Optional[Path], run: Dict, shard_count: int) -> None:
        self.path = path
        self.record: Dict = {"format": CHECKPOINT_FORMAT, "run": run, "shards": {}}
        self.shards: Dict[int, Verdicts] = {}
        if path is None or not Path(path).exists():
            return
        try:
            record = json.loads(Path(path).read_text())
            held = {int(key): Verdicts.from_json(value) for key, value in record["shards"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise GdwsError(
                f"--resume {path} is not a checkpoint this tool wrote: {error}"
            ) from None
        if record.get("format") != CHECKPOINT_FORMAT or record.get("run") != run:
            raise GdwsError(
                f"--resume {path} holds another run (model, data, attacks, seed or batching "
                "differ); give a new file"
            )
        if any(index >= shard_count for index in held):
            raise GdwsError(f"--resume {path} holds shards this run does not have")
        self.record = record
        self.shards = held

    def save(self, index: int, verdicts: Verdicts) -> None:
        """Add a finished shard, rewriting the file atomically."""
        if self.path is None:
            return
        self.record["shards"][str(index)] = verdicts.to_json()
        with atomic_open(self.path) as handle:
            json.dump(self.record, handle)


def _here(
    judge: Judge,
    job: _Job,
    dataset: Dataset,
    transferred: Optional[np.ndarray],
    spans: Sequence[Span],
    todo: Sequence[int],
) -> Iterator[Tuple[int, Verdicts]]:
    """The shards in this process, in order."""
    with judge:
        for index in todo:
            yield index, _verdicts(judge, job, dataset.x, dataset.y, transferred, *spans[index])


def _on_ray(
    job: _Job,
    dataset: Dataset,
    transferred: Optional[np.ndarray],
    spans: Sequence[Span],
    todo: Sequence[int],
    sharding: Sharding,
) -> Iterator[Tuple[int, Verdicts]]:
    """The shards as Ray tasks, yielded as they finish (any order)."""
    ray = _connected(sharding)
    pending: Dict = {}
    try:
        gpus = 1 if job.device.startswith("cuda") else 0
        task = ray.remote(_shard).options(max_retries=SHARD_RETRIES, num_cpus=1, num_gpus=gpus)
        refs = ray.put(job), ray.put(dataset.x), ray.put(dataset.y), ray.put(transferred)
        pending = {task.remote(*refs, *spans[index]): index for index in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                yield pending.pop(ref), ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, GdwsError):  # a user error met in a worker: one line
            raise GdwsError(str(error.cause)) from None
        raise
    finally:
        for ref in pending:
            ray.cancel(ref)


# The (workers, address) of the Ray instance this module started in this process, if any.
_STARTED: Dict[str, Tuple[int, Optional[str]]] = {}


def _connected(sharding: Sharding):
    """The ray module, connected as `sharding` asks: a local instance of `workers` CPUs,
    or the cluster at `address`. An instance this module started stays up for the next
    evaluation (a sweep runs many; Ray stops at exit) unless that one asks for another
    shape; one the caller started is used as it is."""
    try:
        import ray
    except ImportError:
        raise GdwsError(f"--workers and --ray-address need Ray: {RAY_HINT}") from None
    shape = (sharding.workers, sharding.address)
    if ray.is_initialized():
        if _STARTED.get("shape", shape) == shape:
            return ray
        ray.shutdown()
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if sharding.address is not None:
        ray.init(address=sharding.address, **quiet)
    else:
        ray.init(num_cpus=sharding.workers, include_dashboard=False, **quiet)
    _STARTED["shape"] = shape
    return ray


# A Ray worker's opened model (active), kept for the shards of the same job that follow.
_OPENED: Dict[str, Judge] = {}


def _shard(
    job: _Job,
    x: np.ndarray,
    y: np.ndarray,
    transferred: Optional[np.ndarray],
    first: int,
    stop: int,
) -> Verdicts:
    """One shard's verdicts, in a worker process."""
    key = f"{job.digest} {job.device} {job.providers} {job.mean} {job.std}"
    if key not in _OPENED:
        for judge in _OPENED.values():
            judge.__exit__(None, None, None)
        _OPENED.clear()
        torch.set_num_threads(max(job.threads, 1))
        _OPENED[key] = job.judge(x.shape[1]).__enter__()
    return _verdicts(_OPENED[key], job, x, y, transferred, first, stop)


def _verdicts(
    judge: Judge,
    job: _Job,
    x: np.ndarray,
    y: np.ndarray,
    transferred: Optional[np.ndarray],
    first: int,
    stop: int,
) -> Verdicts:
    """The verdicts on samples first..stop-1 by an active judge."""
    return judge.verdicts(
        x[first:stop],
        y[first:stop],
        np.arange(first, stop),
        job.attacks,
        job.batch_size,
        job.seed,
        transferred=None if transferred is None else transferred[first:stop],
    )
