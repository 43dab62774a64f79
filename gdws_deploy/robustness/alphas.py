"""Weight error vectors (eq. 8 of Dbouk & Shanbhag 2021): how much each input channel's
weights matter for the margins of a model, on adversarially perturbed inputs.

For an eligible Conv with weight W (M, C, kh, kw), k = kh*kw, and input channel c:

    alpha_c = mean over samples n and classes j != top(n) of
              sum_{m, k} (d(z_top - z_j) / dW[m, c, k])^2 / (2 (z_top - z_j)^2 M k)

BatchNorm runs on its running statistics (the mirror has inference semantics only).

Vectorized without per-sample loops: one forward records each conv's input and output;
one batched backward (autograd's is_grads_batched, i.e. vmap over the J-1 margin
directions) gives G = d(z_top - z_j)/d(conv output) for every sample and class at once.
The weight gradient of sample n and class j is G[j, n] @ patches(x_n)^T; its per-channel
squared norms come from one batched matmul per layer, or where that costs less, from the
Gram matrices of G and of the patches. Per-sample gradients are never all held at once.
Same multiplications as a per-sample loop, done in large batches: the gain is largest for
small models and on GPUs (benchmarks/alphas_speed.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir import graph as onnx_graph
from gdws_deploy.ir.analyze import AnalyzedModel, analyze
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.robustness.attacks import Attack, pgd, with_normalization
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.device import resolve_device
from gdws_deploy.robustness.mirror import Conv, OnnxMirror

SETTINGS_KEY = "__settings__"
CHUNK_BYTES = 256 * 2**20  # scratch for one chunk of per-(sample, class) weight gradients
_TINY = 1e-12  # a margin of exactly 0 (a tie) would divide by zero
# progress(samples done, samples total)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ConvTarget:
    """One eligible Conv: node name, weight initializer name, weight shape (M, C, kh, kw)."""

    name: str
    weight: str
    weight_shape: Tuple[int, ...]


def eligible_convs(model: Union[onnx.ModelProto, AnalyzedModel]) -> List[ConvTarget]:
    """Every Conv GDWS could rewrite in a model (the first one included), or in an analyzed
    model as its layer selection stands (not analyzed again)."""
    analyzed = model if isinstance(model, AnalyzedModel) else analyze(model, all_layers=True)
    nodes = analyzed.model.graph.node
    return [
        ConvTarget(layer.name, nodes[layer.index].input[1], tuple(layer.weight_shape))
        for layer in GdwsPass().select(analyzed).eligible
    ]


@dataclass
class AlphaSums:
    """Running sums of eq. (8) terms per layer; `count` = sample-class pairs seen."""

    sums: Dict[str, np.ndarray] = field(default_factory=dict)
    count: int = 0

    def add(self, layer: str, terms: torch.Tensor) -> None:
        value = terms.double().cpu().numpy()
        self.sums[layer] = self.sums[layer] + value if layer in self.sums else value

    def alphas(self) -> Dict[str, np.ndarray]:
        if self.count == 0:
            raise GdwsError("no samples to compute alphas from")
        return {layer: total / self.count for layer, total in self.sums.items()}


def _margin_directions(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each sample and class j != top: e_top - e_j (R, N, J) and z_top - z_j (R, N)."""
    count, classes = logits.shape
    top = logits.argmax(1)
    others = torch.arange(classes, device=logits.device).expand(count, classes)
    others = others[others != top[:, None]].reshape(count, classes - 1).t()  # (R, N)
    eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
    directions = eye[top][None] - eye[others]
    margins = logits.gather(1, top[:, None]).t() - logits.gather(1, others.t()).t()
    return directions, margins.detach()


def _channel_terms(
    conv: Conv,
    x_in: torch.Tensor,
    grad_out: torch.Tensor,
    margins: torch.Tensor,
    weight_shape: Tuple[int, ...],
) -> torch.Tensor:
    """sum over samples n and classes r of eq. (8)'s per-channel term, for one layer.

    x_in: conv input (N, C, H, W); grad_out: d margin / d conv output (R, N, M, Ho, Wo).
    With X_n the rows sqrt(w_rn) G_rn (R*M, L) stacked over r and U_n the patches
    (C*k, L), the term of channel c is ||X_n U_nc^T||_F^2 = <X_n^T X_n, U_nc^T U_nc>:
    whichever of the two forms costs fewer multiplications is used.
    """
    out_channels, channels, kh, kw = weight_shape
    kernel = kh * kw
    classes, count = margins.shape
    weights = 1.0 / (2 * margins.square().clamp_min(_TINY) * out_channels * kernel)  # (R, N)
    rows = grad_out.reshape(classes, count, out_channels, -1) * weights.sqrt()[:, :, None, None]
    rows = rows.transpose(0, 1).reshape(count, classes * out_channels, -1)  # X: (N, R*M, L)
    patches = conv.patches(x_in)  # U: (N, C*k, L)
    pixels = patches.shape[2]
    direct = classes * out_channels * channels * kernel * pixels
    gram = pixels * pixels * (classes * out_channels + channels * kernel)
    if gram < direct:
        products = torch.bmm(patches, rows.transpose(1, 2) @ rows) * patches  # (N, C*k, L)
        return products.reshape(count, channels, -1).sum(dim=(0, 2)).double()
    total = torch.zeros(channels, dtype=torch.float64, device=x_in.device)
    chunk = max(1, CHUNK_BYTES // (4 * count * channels * kernel))
    for start in range(0, rows.shape[1], chunk):
        grads = torch.bmm(rows[:, start : start + chunk], patches.transpose(1, 2))
        total += grads.reshape(count, -1, channels, kernel).square().sum(dim=(0, 1, 3)).double()
    return total


def accumulate_alphas(
    model: Callable[[torch.Tensor], torch.Tensor],
    mirror: OnnxMirror,
    convs: Sequence[ConvTarget],
    x: torch.Tensor,
    sums: AlphaSums,
) -> None:
    """Add one batch of inputs to `sums`, vectorized over samples and classes.

    model: what maps x to logits: the mirror itself or a wrapper around it (Normalized).
    """
    names = [conv.name for conv in convs]
    with mirror.recording(names) as records:
        logits = model(x)
    if logits.shape[1] < 2:
        raise GdwsError("alphas need a model with at least 2 classes")
    directions, margins = _margin_directions(logits)
    outputs = [records[name][1][0] for name in names]
    grads = torch.autograd.grad(logits, outputs, grad_outputs=directions, is_grads_batched=True)
    for conv, grad_out in zip(convs, grads):
        x_in = records[conv.name][0][0].detach()
        step = mirror.compiled(conv.name)
        sums.add(conv.name, _channel_terms(step, x_in, grad_out, margins, conv.weight_shape))
    sums.count += margins.numel()


def accumulate_alphas_by_loop(
    model: Callable[[torch.Tensor], torch.Tensor],
    mirror: OnnxMirror,
    convs: Sequence[ConvTarget],
    x: torch.Tensor,
    sums: AlphaSums,
) -> None:
    """eq. (8) term by term, one sample and one class at a time, from weight gradients.

    The slow, obviously-correct reference for the tests and benchmarks/alphas_speed.py.
    """
    weights = [mirror.tensor(conv.weight) for conv in convs]
    for sample in x:
        logits = model(sample[None])[0]
        top = int(logits.argmax())
        for j in range(len(logits)):
            if j == top:
                continue
            gap = logits[top] - logits[j]
            grads = torch.autograd.grad(gap, weights, retain_graph=True)
            for conv, grad in zip(convs, grads):
                out_channels, _, kh, kw = conv.weight_shape
                scale = 2 * max(float(gap.detach()) ** 2, _TINY) * out_channels * kh * kw
                sums.add(conv.name, grad.square().sum(dim=(0, 2, 3)) / scale)
            sums.count += 1


@dataclass(frozen=True)
class AlphaRun:
    """Per-layer alphas (C,) float64 and the settings that produced them."""

    alphas: Dict[str, np.ndarray]
    settings: Dict


def compute_alphas(
    model: Union[str, Path, AnalyzedModel],
    dataset: Dataset,
    attack: Optional[Attack],
    batch_size: int = 64,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    seed: int = 0,
    progress: Optional[Progress] = None,
    device: Union[str, torch.device] = "cpu",
) -> AlphaRun:
    """Alphas of the eligible Convs of an ONNX model (a file: all of them; an analyzed
    model: those of its selection), on `dataset` perturbed by `attack` (PGD from the true
    labels; None: clean inputs), computed on `device` (a --device spec or torch.device)."""
    path = str(model) if isinstance(model, (str, Path)) else None
    analyzed = model if path is None else analyze(onnx_graph.load_model(path), all_layers=True)
    convs = eligible_convs(analyzed)
    if not convs:
        raise GdwsError(f"{path or 'the model'} has no Conv that GDWS can rewrite")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    mirror = OnnxMirror(analyzed.model)
    model = with_normalization(mirror, mean, std, dataset.x.shape[1]).to(device)
    with torch.no_grad():
        dataset.check_model(
            mirror.input_shapes[0],
            lambda sample: model(torch.from_numpy(sample).to(device)).shape[1],
        )
    sums = AlphaSums()
    done = 0
    for x_batch, y_batch in dataset.batches(batch_size):
        x, y = torch.from_numpy(x_batch).to(device), torch.from_numpy(y_batch).to(device)
        if attack is not None:
            x, _ = pgd(
                model,
                x,
                y,
                attack.norm,
                attack.eps,
                attack.steps,
                attack.step_size,
                sample_ids=torch.arange(done, done + len(x)),
                seed=seed,
            )
        accumulate_alphas(model, mirror, convs, x, sums)
        done += len(x)
        if progress is not None:
            progress(done, len(dataset))
    settings = {
        "model": path,
        "dataset": dataset.name,
        "samples": len(dataset),
        "attack": attack.to_dict() if attack is not None else None,
        "mean": list(mean) if mean else None,
        "std": list(std) if std else None,
        "seed": seed,
        "batchnorm": "eval",
    }
    return AlphaRun(sums.alphas(), settings)


def save_alphas(run: AlphaRun, output: Union[str, Path], *inputs: Union[str, Path]) -> Path:
    """npz keyed by Conv node name, settings as JSON under "__settings__"; atomic."""
    out = check_output_path(output, *inputs)
    with atomic_open(out, "wb") as handle:
        np.savez(handle, **run.alphas, **{SETTINGS_KEY: np.array(json.dumps(run.settings))})
    return out


def load_alphas(path: Union[str, Path]) -> AlphaRun:
    """What save_alphas wrote."""
    with np.load(path, allow_pickle=False) as archive:
        alphas = {key: archive[key] for key in archive.files if not key.startswith("__")}
        settings = json.loads(str(archive[SETTINGS_KEY])) if SETTINGS_KEY in archive.files else {}
    return AlphaRun(alphas, settings)
