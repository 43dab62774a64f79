"""Cut a multi-exit ONNX model into stages, one per exit, each a valid ONNX model.

Stage k holds the nodes exit k needs that no earlier exit needed, so a sample that leaves
at exit k has computed nothing beyond it. The tensors later stages read from it become its
extra outputs and their inputs (batch-major, so the runtime can drop the rows of samples
that left). Nodes that depend on no input (constants) are copied into every stage that
uses them rather than handed on. onnx.utils.Extractor cuts each stage out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import onnx
import onnx.utils

from gdws_deploy.atomic import atomic_folder, atomic_open, check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import LoadedModel, TensorType, check_and_infer, load_model
from gdws_deploy.runtime.staged import (
    FINAL,
    MANIFEST,
    METADATA_KEY,
    ExitPolicy,
    StagedModel,
    StageSpec,
    exit_names,
)

FULL_FILE = "full.onnx"
Source = Union[str, Path, onnx.ModelProto, LoadedModel]


@dataclass(frozen=True)
class Stage:
    """One stage: the exit it computes, its tensors in and out, its own MACs (batch 1)."""

    exit: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    model: onnx.ModelProto
    macs: int

    @property
    def file(self) -> str:
        return f"stage_{self.exit}.onnx"


@dataclass(frozen=True)
class SplitModel:
    """The stages of a multi-exit model, its single-pass model (`final` alone) and policy
    (thresholds from the model's metadata when it was calibrated)."""

    stages: Tuple[Stage, ...]
    full: onnx.ModelProto
    policy: ExitPolicy

    def specs(self) -> List[StageSpec]:
        return [StageSpec(s.file, s.exit, s.inputs, s.outputs, s.macs) for s in self.stages]

    def manifest(self, source: str) -> Dict:
        """The folder's manifest.json: stage files and tensors, policy, single-pass model."""
        return {
            "source": source,
            "stages": [
                {
                    "file": s.file,
                    "exit": s.exit,
                    "inputs": list(s.inputs),
                    "outputs": list(s.outputs),
                    "macs": s.macs,
                }
                for s in self.stages
            ],
            "full": {"file": FULL_FILE, "macs": self.policy.full_macs},
            "policy": json.loads(self.policy.to_json()),
        }


def exit_outputs(model: onnx.ModelProto, where: str = "the model") -> List[str]:
    """The model's outputs when they are exit_0, ..., final (in this order); else GdwsError."""
    names = [output.name for output in model.graph.output]
    if len(names) < 2 or names != exit_names(len(names)):
        raise GdwsError(
            f"{where} has outputs {', '.join(names) or 'none'}: a multi-exit model has "
            f"outputs exit_0, exit_1, ..., {FINAL} in this order"
        )
    return names


def split_model(source: Source) -> SplitModel:
    """The stages of a multi-exit model; GdwsError when it is none or cannot be cut."""
    loaded = source if isinstance(source, LoadedModel) else None
    if isinstance(source, (str, Path)):
        loaded = load_model(source)
    model = loaded.model if loaded is not None else source
    where = str(loaded.path) if loaded is not None and loaded.path else "the model"
    outputs = exit_outputs(model, where)
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise GdwsError(f"{where} has {len(inputs)} inputs; a multi-exit model has one")
    types = check_and_infer(model)
    owner = _owners(model, inputs[0], outputs)
    extractor = onnx.utils.Extractor(model)
    extractor.value_infos.update(
        {name: _value_info(name, t) for name, t in types.items() if name not in initializers}
    )
    cuts = _boundaries(model, inputs[0], owner, len(outputs))
    for name in {n for pair in cuts for n in pair[0]}:
        _check_batch_major(name, types, inputs[0], where)
    stages = []
    for exit_name, (needed, handed) in zip(outputs, cuts):
        stage = _extract(extractor, list(needed), [exit_name, *handed], where)
        stages.append(Stage(exit_name, needed, (exit_name, *handed), stage, _macs(stage)))
    full = _extract(extractor, [inputs[0]], [FINAL], where)
    full_macs = _macs(full)
    cumulative = [sum(s.macs for s in stages[: k + 1]) for k in range(len(stages))]
    policy = ExitPolicy(tuple(outputs), tuple(cumulative), full_macs)
    stored = {entry.key: entry.value for entry in model.metadata_props}.get(METADATA_KEY)
    if stored is not None:
        calibrated = ExitPolicy.from_json(stored, where)
        if calibrated.outputs != policy.outputs:
            raise GdwsError(f"{where}: {METADATA_KEY} names other exits than the model has")
        if calibrated.thresholds is not None:
            kept = {k: getattr(calibrated, k) for k in ("budget", "calibration", "scheme")}
            policy = policy.with_thresholds(calibrated.thresholds, **kept)
    return SplitModel(tuple(stages), full, policy)


def write_split(split: SplitModel, out_dir: Union[str, Path], source: str) -> Path:
    """The stages, the single-pass model and manifest.json in `out_dir`, all or nothing."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GdwsError(f"{out} exists and is not a folder")
    names = [*(s.file for s in split.stages), FULL_FILE, MANIFEST]
    if out.exists():
        for name in names:
            check_output_path(out / name, source)
    with atomic_folder(out) as stage_dir:
        for stage in split.stages:
            (stage_dir / stage.file).write_bytes(stage.model.SerializeToString())
        (stage_dir / FULL_FILE).write_bytes(split.full.SerializeToString())
        with atomic_open(stage_dir / MANIFEST) as handle:
            json.dump(split.manifest(source), handle, indent=2)
            handle.write("\n")
    return out


def _owners(model: onnx.ModelProto, image: str, outputs: Sequence[str]) -> Dict[int, int]:
    """Node index -> the first exit that needs it, for nodes that depend on the input."""
    producer = {name: i for i, node in enumerate(model.graph.node) for name in node.output}
    dynamic: Set[str] = {image}
    for node in model.graph.node:  # graph order is topological
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
    owner: Dict[int, int] = {}
    for k, output in enumerate(outputs):
        stack = [output]
        while stack:
            index = producer.get(stack.pop())
            if index is None or index in owner:
                continue
            node = model.graph.node[index]
            if any(name in dynamic for name in node.output):
                owner[index] = k
            stack.extend(name for name in node.input if name in dynamic)
    return owner


def _boundaries(
    model: onnx.ModelProto, image: str, owner: Dict[int, int], count: int
) -> List[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
    """Per stage: the tensors it reads from the input or earlier stages, and those it
    hands on to later stages, each in graph order."""
    made_in = {image: -1}
    for index, k in sorted(owner.items()):
        made_in.update({name: k for name in model.graph.node[index].output if name})
    reads: List[List[str]] = [[] for _ in range(count)]
    hands: List[List[str]] = [[] for _ in range(count)]
    for index, k in sorted(owner.items()):
        for name in model.graph.node[index].input:
            source = made_in.get(name)
            if source is not None and source < k and name not in reads[k]:
                reads[k].append(name)
                if source >= 0 and name not in hands[source]:
                    hands[source].append(name)
    return [(tuple(r), tuple(h)) for r, h in zip(reads, hands)]


def _check_batch_major(name: str, types: Dict[str, TensorType], image: str, where: str) -> None:
    """A tensor handed between stages must have the input's batch axis first."""
    shape, batch = types[name].shape, types[image].shape
    if not shape or not batch or shape[0] != batch[0] or shape[0] is None:
        raise GdwsError(
            f"{where}: tensor {name} flows between stages but its first axis is not the "
            "batch, so samples cannot leave the batch there"
        )


def _value_info(name: str, tensor: TensorType) -> onnx.ValueInfoProto:
    shape = None if tensor.shape is None else list(tensor.shape)
    return onnx.helper.make_tensor_value_info(name, tensor.elem_type, shape)


def _extract(
    extractor: onnx.utils.Extractor, inputs: List[str], outputs: List[str], where: str
) -> onnx.ModelProto:
    """The subgraph from `inputs` to `outputs`, checked strictly (shapes inferred)."""
    model = extractor.extract_model(inputs, outputs)
    del model.metadata_props[:]
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise GdwsError(
            f"{where}: the stage for {outputs[0]} fails onnx.checker: {error}"
        ) from error
    return model


def _macs(model: onnx.ModelProto) -> int:
    return analyze(model).total_macs


def open_staged(
    path: Union[str, Path],
    backend: str = "ort",
    thresholds: Optional[Sequence[float]] = None,
    threads: int = 0,
) -> StagedModel:
    """The staged runtime of a stage folder, or of a multi-exit ONNX file split in memory
    (onnxruntime only: TensorRT runs engines built from a folder's stages)."""
    source = Path(path)
    if source.is_dir() or not source.is_file():
        return StagedModel.open(source, backend, thresholds, threads=threads)
    if backend != "ort":
        raise GdwsError(f"TensorRT runs a stage folder: run `gdws-deploy exits split {source}`")
    split = split_model(source)
    files = [stage.model.SerializeToString() for stage in split.stages]
    staged = StagedModel.from_files(files, split.specs(), split.policy, thresholds, threads=threads)
    staged.full = split.full.SerializeToString()
    return staged
