"""A short PGD adversarial fine-tune of any ONNX classifier, converted or not, through the
torch mirror, written back as the same graph with new weight values.

Compression passes work without retraining; this measures what a few hundred steps of
adversarial training (Madry et al. 2018) on the calibration split win back after an
aggressive cut (the training part of ATMC, Gui et al. 2019, in its simplest form). The
pass's structure is kept: only the values of float weight initializers change; their
names, shapes and types, every node, every integer or shape constant and BatchNorm's
running statistics stay as they were, and an entry that is exactly zero (a pruned weight;
a bias too) stays exactly zero, so sparsity and kernel counts survive.

Deterministic for a seed: batches come from a seeded permutation of the data, PGD's
random starts from the attacks' per-sample hashing (seeded by sample id, seed and step),
and nothing else is random.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)
from onnx import TensorProto, helper, numpy_helper

from gdws_deploy.atomic import check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import LoadedModel, load_model, save_model
from gdws_deploy.robustness.attacks import Attack, make_attacks, pgd, with_normalization
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.device import resolve_device
from gdws_deploy.robustness.evaluate import IN_MEMORY
from gdws_deploy.robustness.mirror import OnnxMirror

ModelSource = Union[str, Path, onnx.ModelProto, LoadedModel]
# progress(steps done, steps total)
Progress = Callable[[int, int], None]

# The inputs that hold a layer's learned weights, per op; any other float initializer (a
# Clip bound, a Pad value, a normalization constant baked into the graph) is left alone.
WEIGHT_INPUTS: Dict[str, Tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),  # scale and bias; the running statistics stay frozen
    "PRelu": (1,),
}
# An Add of a constant to the output of one of these is the layer's bias, split off by
# the exporter (MatMul + Add for a linear layer).
BIASED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
# Ops of a quantized graph: its weights are integers a float fine-tune cannot move.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
    }
)


def default_attack() -> Attack:
    """PGD l_inf 8/255, 10 steps of 2.5 * eps / steps, as the attack flags default."""
    (attack,) = make_attacks("pgd-linf")
    return attack


@dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune.

    steps: optimizer steps (0 writes the model back unchanged); batch_size: samples per
    step; lr: SGD's initial learning rate, annealed to 0 over the steps (cosine), so the
    last steps settle instead of leaving the weights wherever the last batch pushed them;
    momentum and weight_decay: SGD's. attack: the PGD each batch is perturbed with (None:
    clean training); clean_share: weight of the clean loss beside the adversarial one
    (0: adversarial only, as Madry et al.). seed: batch order and PGD starts. mean/std:
    the per-channel normalization the model expects of [0, 1] images (None: none).
    device: where the mirror trains (a --device spec).

    lr 0.001 by default: BatchNorm is folded into the exported weights, so nothing
    normalizes a step; at 0.01 a GDWS-cut VGG-16 lost 9.5 points of robust accuracy in 150
    steps where 0.001 won 1.8 back, and the bundled model recovers at either.
    """

    steps: int = 200
    batch_size: int = 64
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    attack: Optional[Attack] = field(default_factory=default_attack)
    clean_share: float = 0.0
    seed: int = 0
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 0 or int(self.steps) != self.steps:
            raise GdwsError(f"fine-tune steps must be a whole number >= 0, got {self.steps}")
        if self.batch_size < 1 or int(self.batch_size) != self.batch_size:
            raise GdwsError(f"batch size must be a whole number >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GdwsError(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise GdwsError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise GdwsError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.clean_share <= 1:
            raise GdwsError(f"clean share must be in [0, 1], got {self.clean_share}")
        if self.attack is None and self.clean_share > 0:
            raise GdwsError("clean share weighs the clean loss against an attack's: give one")
        if self.attack is not None and self.attack.method != "pgd":
            raise GdwsError(f"fine-tuning perturbs with PGD, not {self.attack.name}")

    def to_dict(self) -> Dict:
        record = asdict(self)
        record["attack"] = self.attack.to_dict() if self.attack is not None else None
        return record


@dataclass(frozen=True)
class FinetuneReport:
    """What a fine-tune did. tensors: the initializers trained; entries: their values;
    zeros: entries held at exactly zero. Per step: loss (the training objective on that
    step's batch, before the update) and accuracy (on the inputs trained on: adversarial
    ones when attacking)."""

    model: str
    dataset: str
    options: FinetuneOptions
    tensors: Tuple[str, ...]
    entries: int
    zeros: int
    losses: Tuple[float, ...]
    accuracies: Tuple[float, ...]
    seconds: float

    def to_dict(self) -> Dict:
        record = asdict(self)
        record["options"] = self.options.to_dict()
        record["tensors"], record["losses"] = list(self.tensors), list(self.losses)
        record["accuracies"] = list(self.accuracies)
        return record


def trainable_weights(model: onnx.ModelProto) -> List[str]:
    """The float initializers (main graph) a fine-tune trains: those every node reading
    them reads as a layer's weights (WEIGHT_INPUTS, or an Add that biases a layer's
    output). GdwsError for a quantized model and for one with no float weights."""
    graph = model.graph
    quantized = sorted({node.op_type for node in graph.node} & QUANTIZED_OPS)
    if quantized:
        raise GdwsError(
            f"the model is quantized ({', '.join(quantized)}): fine-tune the float model, "
            "then quantize it"
        )
    floats = {t.name for t in graph.initializer if t.data_type in FLOAT_TYPES}
    producers = {output: node.op_type for node in graph.node for output in node.output}
    weight, other = _weight_reads(graph.node, producers)
    names = [t.name for t in graph.initializer if t.name in floats & (weight - other)]
    if not names:
        raise GdwsError("the model has no float weight initializers to fine-tune")
    return names


def _weight_reads(
    nodes: Sequence[onnx.NodeProto], producers: Dict[str, str]
) -> Tuple[Set[str], Set[str]]:
    """(tensors some node reads as weights, tensors some node reads otherwise)."""
    weight, other = set(), set()
    for node in nodes:
        positions = WEIGHT_INPUTS.get(node.op_type, ())
        if node.op_type == "Add":
            positions = tuple(
                index for index in (0, 1) if producers.get(node.input[1 - index]) in BIASED_OPS
            )
        for index, name in enumerate(node.input):
            (weight if index in positions else other).add(name)
    return weight, other


def finetune(
    model: ModelSource,
    dataset: Dataset,
    options: Optional[FinetuneOptions] = None,
    *,
    progress: Optional[Progress] = None,
) -> Tuple[onnx.ModelProto, FinetuneReport]:
    """Fine-tune `model` on `dataset` (its training split: evaluate on another): the same
    graph with new values in its float weight initializers, and the report."""
    options = options or FinetuneOptions()
    start = time.perf_counter()
    loaded = _loaded(model)
    names = trainable_weights(loaded.model)
    device = resolve_device(options.device)
    mirror = OnnxMirror(loaded.model)
    if len(mirror.input_shapes) != 1:
        raise GdwsError(
            f"fine-tuning needs a model with one input, this one has {len(mirror.input_shapes)}"
        )
    target = with_normalization(mirror, options.mean, options.std, dataset.x.shape[1])
    target = target.to(device)
    _check_classifier(target, mirror, dataset, device)
    mirror.requires_grad_(False)
    weights = [mirror.tensor(name).requires_grad_(True) for name in names]
    kept = [weight != 0 for weight in weights]
    losses, accuracies = _train(target, weights, kept, dataset, options, device, progress)
    values = {name: weight.detach().cpu().numpy() for name, weight in zip(names, weights)}
    tuned = _with_values(loaded.model, values)
    report = FinetuneReport(
        model=str(loaded.path) if loaded.path is not None else IN_MEMORY,
        dataset=dataset.name,
        options=options,
        tensors=tuple(names),
        entries=sum(weight.numel() for weight in weights),
        zeros=sum(int((~mask).sum()) for mask in kept),
        losses=tuple(losses),
        accuracies=tuple(accuracies),
        seconds=time.perf_counter() - start,
    )
    return tuned, report


def finetune_file(
    source: Union[str, Path],
    output: Union[str, Path],
    dataset: Dataset,
    options: Optional[FinetuneOptions] = None,
    *,
    progress: Optional[Progress] = None,
) -> FinetuneReport:
    """finetune() from file to file, stored as the source was (external data or not). The
    output path is checked before any training; the input is never written."""
    check_output_path(output, source)
    loaded = load_model(source)
    tuned, report = finetune(loaded, dataset, options, progress=progress)
    save_model(tuned, output, like=loaded)
    return report


def batch_order(samples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """(steps, batch_size) sample indices: seeded permutations of the data, one after
    another, so each epoch sees every sample once."""
    epochs = -(-steps * batch_size // samples)
    keys = np.random.default_rng(seed).random((epochs, samples))
    order = keys.argsort(axis=1).reshape(-1)
    return order[: steps * batch_size].reshape(steps, batch_size)


def _train(
    target: torch.nn.Module,
    weights: List[torch.Tensor],
    kept: List[torch.Tensor],
    dataset: Dataset,
    options: FinetuneOptions,
    device: torch.device,
    progress: Optional[Progress],
) -> Tuple[List[float], List[float]]:
    """SGD over the batches; pruned entries get no gradient, so momentum and weight decay
    never move them either. Returns per step the loss and the accuracy on its batch."""
    optimizer = torch.optim.SGD(
        weights, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(options.steps, 1))
    order = batch_order(len(dataset), options.steps, options.batch_size, options.seed)
    attack = options.attack
    losses, accuracies = [], []
    for step, index in enumerate(order):
        x = torch.from_numpy(dataset.x[index]).to(device)
        y = torch.from_numpy(dataset.y[index]).to(device)
        trained_on = x
        if attack is not None:
            trained_on, _ = pgd(
                target,
                x,
                y,
                attack.norm,
                attack.eps,
                attack.steps,
                attack.step_size,
                attack.loss,
                sample_ids=torch.from_numpy(index),
                seed=options.seed,
                restart=step,
            )
        logits = target(trained_on)
        loss = F.cross_entropy(logits, y)
        if attack is not None and options.clean_share > 0:
            clean = F.cross_entropy(target(x), y)
            loss = (1 - options.clean_share) * loss + options.clean_share * clean
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        for weight, mask in zip(weights, kept):
            if weight.grad is not None:  # None: the weight does not reach the output
                weight.grad.mul_(mask)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        accuracies.append(float((logits.detach().argmax(1) == y).float().mean()))
        if not math.isfinite(losses[-1]):
            raise GdwsError(f"the loss diverged at step {step + 1}: lower the learning rate")
        if progress is not None:
            progress(step + 1, options.steps)
    return losses, accuracies


def _check_classifier(
    target: torch.nn.Module, mirror: OnnxMirror, dataset: Dataset, device: torch.device
) -> None:
    """GdwsError unless the model maps the dataset's images to one row of class scores."""

    def classes(x: np.ndarray) -> int:
        with torch.no_grad():
            scores = target(torch.from_numpy(x).to(device))
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise GdwsError("fine-tuning needs a classifier with one (batch, classes) output")
        return int(scores.shape[1])

    dataset.check_model(mirror.input_shapes[0], classes)


def _with_values(model: onnx.ModelProto, values: Dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `values` hold them, each in its own
    element type; everything else, the graph included, is copied unchanged."""
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    for tensor in tuned.graph.initializer:
        if tensor.name not in values:
            continue
        with np.errstate(over="ignore"):  # a value out of float16's range: refused below
            value = values[tensor.name].astype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if not np.isfinite(value).all():
            raise GdwsError(
                f"fine-tuned {tensor.name!r} does not fit its type "
                f"{TensorProto.DataType.Name(tensor.data_type)}: lower the learning rate"
            )
        for stored in ("float_data", "int32_data", "double_data"):
            tensor.ClearField(stored)
        tensor.raw_data = numpy_helper.from_array(value).raw_data
    return tuned


def _loaded(model: ModelSource) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return LoadedModel(model)
    return load_model(model)
