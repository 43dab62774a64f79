"""A multi-exit model run stage by stage: each sample leaves at the first confident exit.

A multi-exit model has outputs `exit_0`, ..., `exit_{K-2}`, `final` (logits each). Split
into stages (`gdws-deploy exits split`), stage k computes exit k from what earlier stages
handed on. A sample leaves at exit k when the softmax entropy of its logits there is at most
threshold k (nats); the others go on, so later stages run on ever smaller batches.

The policy (thresholds, MACs) lives in the model's metadata under METADATA_KEY and in the
stage folder's manifest. Python 3.8, numpy only: this runs on the Jetson (onnxruntime or
TensorRT engines built from the stages with `gdws-deploy build`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from gdws_deploy.errors import GdwsError

METADATA_KEY = "gdws_deploy.exits"
MANIFEST = "manifest.json"
FINAL = "final"
# A threshold below every entropy (entropies are >= 0): the exit is closed.
CLOSED = -1.0


def exit_names(count: int) -> List[str]:
    """The outputs of a model with `count` exits, the final one included."""
    return [f"exit_{k}" for k in range(count - 1)] + [FINAL]


def entropy(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy in nats of each row of (N, classes) logits, (N,) float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=1)


def leaves(logits: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) bool: which samples leave at an exit with these logits and threshold."""
    return entropy(logits) <= threshold


def exit_taken(logits_per_exit: Sequence[np.ndarray], thresholds: Sequence[float]) -> np.ndarray:
    """(N,) int64: the first exit k whose entropy is <= thresholds[k], else the final exit.

    logits_per_exit: K arrays (N, classes), the final exit last; thresholds: K - 1 values.
    The one definition of the gate: the staged runtime, calibration and attacks share it.
    """
    if len(thresholds) != len(logits_per_exit) - 1:
        raise GdwsError(
            f"{len(logits_per_exit)} exits need {len(logits_per_exit) - 1} thresholds, "
            f"got {len(thresholds)}"
        )
    final = len(logits_per_exit) - 1
    if final == 0:
        return np.zeros(len(logits_per_exit[0]), dtype=np.int64)
    passes = np.stack([leaves(z, t) for z, t in zip(logits_per_exit, thresholds)], axis=1)
    return np.where(passes.any(axis=1), passes.argmax(axis=1), final).astype(np.int64)


@dataclass(frozen=True)
class ExitPolicy:
    """What METADATA_KEY holds: the exits, their thresholds and what each exit costs.

    stage_macs: cumulative MACs at batch 1 to reach and compute each exit (every stage up
    to it, exit heads included); full_macs: the single-pass model (the graph of `final`
    alone), what budgets are shares of. thresholds: None until calibrated.
    """

    outputs: Tuple[str, ...]
    stage_macs: Tuple[int, ...]
    full_macs: int
    thresholds: Optional[Tuple[float, ...]] = None
    budget: Optional[float] = None
    calibration: Optional[str] = None
    scheme: Optional[str] = None
    calibration_accuracy: Optional[float] = None
    expected_share: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str) -> ExitPolicy:
        """Parsed and checked; GdwsError naming `where` when it is not a policy."""
        try:
            record = json.loads(text)
            policy = cls(
                outputs=tuple(record["outputs"]),
                stage_macs=tuple(int(m) for m in record["stage_macs"]),
                full_macs=int(record["full_macs"]),
                thresholds=None
                if record.get("thresholds") is None
                else tuple(float(t) for t in record["thresholds"]),
                **{key: record.get(key) for key in _OPTIONAL},
            )
        except (ValueError, KeyError, TypeError) as error:
            raise GdwsError(f"{where}: {METADATA_KEY} is not an exit policy ({error})") from None
        if policy.thresholds is not None:
            policy.check_thresholds(policy.thresholds, where)
        return policy

    def check_thresholds(self, thresholds: Sequence[float], where: str = "thresholds") -> None:
        if len(thresholds) != len(self.outputs) - 1:
            raise GdwsError(
                f"{where}: {len(self.outputs)} exits need {len(self.outputs) - 1} thresholds, "
                f"got {len(thresholds)}"
            )
        if not all(np.isfinite(thresholds)):
            raise GdwsError(f"{where}: thresholds must be finite numbers, got {list(thresholds)}")

    def with_thresholds(self, thresholds: Sequence[float], **record: Any) -> ExitPolicy:
        self.check_thresholds(thresholds)
        return replace(self, thresholds=tuple(float(t) for t in thresholds), **record)

    def expected_macs(self, exits: np.ndarray) -> float:
        """Mean MACs per sample (batch 1) of samples leaving at these exit indices."""
        return float(np.mean(np.asarray(self.stage_macs, dtype=np.float64)[exits]))

    def share(self, exits: np.ndarray) -> float:
        """expected_macs as a share of the single-pass model's MACs."""
        return self.expected_macs(exits) / self.full_macs


_OPTIONAL = ("budget", "calibration", "scheme", "calibration_accuracy", "expected_share")


class _OrtStage:
    """One stage in onnxruntime: named inputs in, named outputs out."""

    def __init__(self, model: Union[str, Path, bytes], providers: Any, threads: int) -> None:
        from gdws_deploy.runtime.runner import OrtRunner

        # stages take turns: spinning threads of one would slow the next (1.7x here)
        self.runner = OrtRunner(model, providers=providers, threads=threads, spinning=False)
        self.runner.activate()
        self.outputs = [o.name for o in self.runner.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        arrays = self.runner.session.run(self.outputs, dict(feeds))
        return dict(zip(self.outputs, arrays))

    def close(self) -> None:
        self.runner.deactivate()


class _TrtStage:
    """One stage as a TensorRT engine (one input, every output copied back)."""

    def __init__(self, engine: Path) -> None:
        from gdws_deploy.runtime.trt_runner import TrtRunner

        self.runner = TrtRunner(engine)
        self.runner.activate()

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        (name, batch), runner = next(iter(feeds.items())), self.runner
        if len(feeds) != 1 or name != runner.input_name:
            raise GdwsError(f"engine {runner.engine_path} takes {runner.input_name} alone")
        source, outputs = runner.bind(batch.shape)
        source[...] = batch
        runner.copy_in(source)
        runner.execute()
        runner.copy_out(outputs)
        runner.cuda.synchronize(runner.stream)
        return {t.name: np.array(v) for t, v in zip(runner.outputs, outputs)}

    def close(self) -> None:
        self.runner.deactivate()


@dataclass(frozen=True)
class StageSpec:
    """A stage as the manifest lists it: its file, the exit it computes, its tensors."""

    file: str
    exit: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    macs: int


def read_manifest(folder: Path) -> Tuple[List[StageSpec], ExitPolicy, Dict[str, Any]]:
    """The stages and policy of a folder `exits split` wrote (and the whole record)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise GdwsError(f"{folder} has no {MANIFEST}: is it a folder `exits split` wrote?")
    try:
        record = json.loads(path.read_text())
        specs = [
            StageSpec(s["file"], s["exit"], tuple(s["inputs"]), tuple(s["outputs"]), s["macs"])
            for s in record["stages"]
        ]
        policy_text = json.dumps(record["policy"])
        str(record["full"]["file"])
    except (ValueError, KeyError, TypeError) as error:
        raise GdwsError(f"{path} is not a stage manifest ({error})") from None
    return specs, ExitPolicy.from_json(policy_text, str(path)), record


class StagedModel:
    """Stages run in turn on a batch; samples that exit drop out of the batch.

    `rows` holds, after each predict, how many samples each stage ran on (fewer than the
    stages when every sample left early).
    """

    def __init__(
        self,
        stages: Sequence[Any],
        specs: Sequence[StageSpec],
        policy: ExitPolicy,
        thresholds: Optional[Sequence[float]] = None,
    ) -> None:
        self.stages, self.specs, self.policy = list(stages), list(specs), policy
        chosen = policy.thresholds if thresholds is None else tuple(thresholds)
        if chosen is None:
            raise GdwsError(
                "the model has no exit thresholds: run `gdws-deploy exits calibrate` "
                "or give thresholds"
            )
        policy.check_thresholds(chosen)
        self.thresholds = tuple(float(t) for t in chosen)
        self.input = specs[0].inputs[0]
        # tensors some later stage reads, after each stage
        self.kept = [
            {name for later in specs[k + 1 :] for name in later.inputs} for k in range(len(specs))
        ]
        self.rows: List[int] = []
        # the single-pass model (`final` alone) where open() found it: ONNX file or
        # serialized model for onnxruntime, engine for TensorRT
        self.full: Optional[Union[Path, bytes]] = None

    @classmethod
    def open(
        cls,
        path: Union[str, Path],
        backend: str = "ort",
        thresholds: Optional[Sequence[float]] = None,
        providers: Optional[Sequence[str]] = None,
        threads: int = 0,
    ) -> StagedModel:
        """A stage folder `exits split` wrote. backend trt runs `<stage>.plan` engines built
        with `gdws-deploy build` beside each stage's ONNX file. (On the host,
        gdws_deploy.exits.split.open_staged also opens a multi-exit ONNX file as it is.)"""
        source = Path(path)
        if backend not in ("ort", "trt"):
            raise GdwsError(f"backend must be ort or trt, got {backend!r}")
        if not source.is_dir():
            what = "is a file" if source.is_file() else "does not exist"
            raise GdwsError(
                f"{source} {what}: the staged runtime runs a stage folder "
                f"(`gdws-deploy exits split MODEL.onnx -o FOLDER` makes one)"
            )
        specs, policy, record = read_manifest(source)
        files = [source / spec.file for spec in specs]
        full = source / record["full"]["file"]
        staged = cls.from_files(files, specs, policy, thresholds, backend, providers, threads)
        staged.full = full if backend == "ort" else _engine_of(full)
        return staged

    @classmethod
    def from_files(
        cls,
        files: Sequence[Union[Path, bytes]],
        specs: Sequence[StageSpec],
        policy: ExitPolicy,
        thresholds: Optional[Sequence[float]] = None,
        backend: str = "ort",
        providers: Optional[Sequence[str]] = None,
        threads: int = 0,
    ) -> StagedModel:
        """Stages from their ONNX files (or serialized models, onnxruntime only)."""
        stages: List[Any] = []
        try:
            for file in files:
                if backend == "ort":
                    stages.append(_OrtStage(file, providers, threads))
                else:
                    stages.append(_TrtStage(_engine_of(Path(file))))
            return cls(stages, specs, policy, thresholds)
        except BaseException:
            for stage in stages:
                stage.close()
            raise

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        self.stages = []

    def predict(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(N, classes) logits each sample left with and (N,) the exit it took."""
        logits, taken, _ = self._run(np.asarray(x, dtype=np.float32), gated=True)
        return logits, taken

    def exit_logits(self, x: np.ndarray) -> List[np.ndarray]:
        """Every exit's (N, classes) logits, all stages run on the whole batch."""
        return self._run(np.asarray(x, dtype=np.float32), gated=False)[2]

    def _run(self, x: np.ndarray, gated: bool) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
        """The gated logits and exits taken (gated) and every exit's logits computed."""
        if not self.stages:
            raise GdwsError("the staged model is closed")
        final = len(self.stages) - 1
        live = np.arange(len(x))
        logits = np.zeros((len(x), 0), dtype=np.float32)
        taken = np.full(len(x), final, dtype=np.int64)
        carried: Dict[str, np.ndarray] = {self.input: x}
        every: List[np.ndarray] = []
        self.rows = []
        for k, (stage, spec) in enumerate(zip(self.stages, self.specs)):
            if live.size == 0:
                break
            out = stage.run({name: carried[name] for name in spec.inputs})
            self.rows.append(int(live.size))
            scores = np.asarray(out[spec.exit], dtype=np.float32)
            every.append(scores)
            if k == 0:
                logits = np.zeros((len(x), scores.shape[1]), dtype=np.float32)
            carried = {n: v for n, v in {**carried, **out}.items() if n in self.kept[k]}
            if not gated:
                continue
            leave = leaves(scores, self.thresholds[k]) if k < final else np.ones(live.size, bool)
            logits[live[leave]] = scores[leave]
            taken[live[leave]] = k
            live = live[~leave]
            carried = {name: value[~leave] for name, value in carried.items()}
        if not gated and every:
            logits = every[-1]
        return logits, taken, every


def _engine_of(onnx_file: Path) -> Path:
    """The TensorRT engine built for a stage: `<stage>.plan` beside its ONNX file."""
    engine = onnx_file.with_suffix(".plan")
    if not engine.is_file():
        raise GdwsError(
            f"no engine {engine}: build it with `gdws-deploy build {onnx_file} -o {engine}`"
        )
    return engine
