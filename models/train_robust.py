"""PGD adversarial training of the bundled robust model, reproducibly, on 2 CPU cores.

Trains models.networks.small_vgg with l_inf PGD-AT (Madry et al. 2018) on offline data,
exports it to ONNX and writes a JSON record beside it: clean and robust accuracy on the
test split measured by gdws_deploy.robustness.evaluate (the same code as `gdws-deploy eval`: attacks
through the torch mirror, verdicts from onnxruntime), the training settings, and the
kernel spectra of every 3x3 conv as GDWS sees them (BatchNorm folded into the weights).

    python models/train_robust.py                     # models/robust_photos.onnx + .json
    python models/train_robust.py --dataset digits -o /tmp/robust_digits.onnx

`photos` (32x32 patches of scikit-image's photographs) is the default because it gives
the structured kernels of real robust CNNs; `digits` (sklearn's 8x8 digits, upsampled to
32x32 so the network is the same) is kept to show that it does not (DESIGN.md, "Kernel
structure decides what GDWS can do").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import onnx
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.atomic import atomic_open, check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.gdws.spectra import onnx_conv_spectra
from gdws_deploy.robustness.attacks import Attack, make_attacks, pgd
from gdws_deploy.robustness.data import Dataset, load_dataset
from gdws_deploy.robustness.evaluate import evaluate
from models.export import export_onnx
from models.networks import small_vgg

IMAGE_SIZE = 32


@dataclass(frozen=True)
class Recipe:
    dataset: str
    seed: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    init_scale: float
    train_attack: Attack
    eval_attack: Attack
    threads: int


def load_split(dataset: str, split: str) -> Dataset:
    """The `split` ("train" or "test") of a gdws_deploy.robustness.data dataset, at 32x32 pixels.

    Smaller images (digits: 8x8) are upsampled bilinearly, so every dataset trains the
    same network at the same cost per layer.
    """
    data = load_dataset(f"{dataset}:{split}")
    if data.x.shape[-1] == IMAGE_SIZE:
        return data
    images = nn.functional.interpolate(
        torch.from_numpy(data.x), size=IMAGE_SIZE, mode="bilinear", align_corners=False
    )
    return Dataset(f"{data.name}@{IMAGE_SIZE}x{IMAGE_SIZE}", images.clamp(0, 1).numpy(), data.y)


def build_model(
    recipe: Recipe, data: Dataset, architecture: Callable[..., nn.Module] = small_vgg
) -> nn.Module:
    """The seeded, untrained network for `data`, its conv kernels scaled by init_scale."""
    torch.manual_seed(recipe.seed)
    classes = int(data.y.max()) + 1
    model = architecture(num_classes=classes, in_channels=data.x.shape[1])
    _scale_conv_init(model, recipe.init_scale)
    return model


# (recipe, model, images, labels, their indices in the data, attack seed) -> the loss of
# one training step
BatchLoss = Callable[
    [Recipe, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor
]


def pgd_at_loss(
    recipe: Recipe, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, seed: int
) -> torch.Tensor:
    """PGD-AT (Madry et al.): the loss on PGD images made against the current model."""
    attack = recipe.train_attack
    x_adv, _ = pgd(
        model, x, y, "linf", attack.eps, attack.steps, attack.step_size, "ce", True, ids, seed
    )
    return nn.functional.cross_entropy(model(x_adv), y)


def train(
    recipe: Recipe, model: nn.Module, data: Dataset, batch_loss: BatchLoss = pgd_at_loss
) -> nn.Module:
    """SGD (Nesterov) with a one-cycle schedule and random flips on `batch_loss`: PGD-AT
    unless told otherwise."""
    gen = torch.Generator().manual_seed(recipe.seed)
    images, labels = torch.from_numpy(data.x), torch.from_numpy(data.y)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        nesterov=True,
    )
    batches = -(-len(labels) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=recipe.epochs * batches
    )
    model.train()
    for epoch in range(recipe.epochs):
        for batch in torch.randperm(len(labels), generator=gen).split(recipe.batch_size):
            x, y = _random_flip(images[batch], gen), labels[batch]
            seed = int(torch.randint(1 << 62, (), generator=gen))
            loss = batch_loss(recipe, model, x, y, batch, seed)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{recipe.epochs}: last batch loss {loss.item():.3f}", flush=True)
    return model.eval()


def _scale_conv_init(model: nn.Module, scale: float) -> None:
    """Shrink the random initial conv kernels by `scale`.

    A few minutes of training leave much of the full-rank random start in every kernel
    (weight decay has no time to remove it, as it does over a real 100+ epoch run), which
    would make the kernels look far less structured than a real robust model's. BatchNorm
    follows every conv, so the scale changes no output (but through BatchNorm's epsilon),
    only how fast training moves away from the start.
    """
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.mul_(scale)


def conv_kernels(model: nn.Module) -> List[torch.Tensor]:
    """A detached copy of every conv weight, in module order."""
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Conv2d)]


def init_overlap(kernels: Sequence[torch.Tensor], initial: Sequence[torch.Tensor]) -> List[float]:
    """Per conv: mean over output channels of cos^2(kernel, its initial kernel).

    The share of each trained kernel's energy still pointing along its random start;
    near 0 when training has replaced the start, 1 when it has not moved. Scaling an
    output channel (BatchNorm folded in at export) leaves it unchanged.
    """
    shares = []
    for kernel, start in zip(kernels, initial):
        cosine = nn.functional.cosine_similarity(kernel.flatten(1), start.flatten(1), dim=1)
        shares.append(round(float((cosine**2).mean()), 4))
    return shares


def _random_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (a mirrored patch is the same photo)."""
    flip = torch.rand(len(images), generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def run(recipe: Recipe, output: Path) -> Dict[str, object]:
    """Train, export to `output`, measure, and write the JSON record beside it."""
    torch.set_num_threads(recipe.threads)
    train_data, test_data = load_split(recipe.dataset, "train"), load_split(recipe.dataset, "test")
    load_before = os.getloadavg()[0]
    model = build_model(recipe, train_data)
    initial = conv_kernels(model)
    start = time.perf_counter()
    train(recipe, model, train_data)
    train_seconds = time.perf_counter() - start
    load = (load_before, os.getloadavg()[0])
    input_shape = (1, *test_data.x.shape[1:])
    export_onnx(model, output, input_shape)
    report = evaluate(output, test_data, [recipe.eval_attack], seed=recipe.seed)
    record = {
        **model_facts(output, "models.networks.small_vgg", input_shape, train_data, test_data),
        "test_accuracy": {**report.to_dict(), "model": output.name},
        **training_facts(recipe, onnx.load(str(output)), model, initial, train_seconds, load),
    }
    write_record(output, record)
    return record


def model_facts(
    output: Path, architecture: str, input_shape: Sequence[int], train: Dataset, test: Dataset
) -> Dict[str, object]:
    """What a model record opens with: the file, its network, input and data."""
    return {
        "model": output.name,
        "architecture": architecture,
        "input_shape": ["batch", *input_shape[1:]],
        "input_range": [0.0, 1.0],
        "classes": int(train.y.max()) + 1,
        "dataset": {
            "train": train.name,
            "test": test.name,
            "train_samples": len(train),
            "test_samples": len(test),
        },
    }


def training_facts(
    recipe: Recipe,
    exported: onnx.ModelProto,
    model: nn.Module,
    initial: Sequence[torch.Tensor],
    train_seconds: float,
    load: Tuple[float, float],
) -> Dict[str, object]:
    """How it was trained and what its kernels became: recipe, kernel structure, time,
    load (the 1-minute load average when training started and ended: the machine may be
    shared) and environment."""
    return {
        "recipe": asdict(recipe),
        "kernel_spectra": onnx_conv_spectra(exported),
        "init_overlap": init_overlap(conv_kernels(model), initial),
        "train_seconds": round(train_seconds, 1),
        "load_average": {"train_start": load[0], "train_end": load[1]},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }


def write_record(output: Path, record: Dict[str, object]) -> None:
    """The JSON record beside the model, written atomically."""
    with atomic_open(output.with_suffix(".json")) as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    eps = {"linf": args.eps / 255}
    (train_attack,) = make_attacks("pgd-linf", eps, args.train_steps)
    (eval_attack,) = make_attacks("pgd-linf", eps, args.eval_steps, {"linf": args.eps / 255 / 4})
    return Recipe(
        dataset=args.dataset,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
        init_scale=args.init_scale,
        train_attack=train_attack,
        eval_attack=eval_attack,
        threads=args.threads,
    )


def add_recipe_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    """The flags of a training recipe (and its output), shared by the training scripts."""
    parser.add_argument("-o", "--output", default=None, help="ONNX path; JSON goes beside it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--init-scale", type=float, default=0.1, help="conv init multiplier")
    parser.add_argument("--eps", type=float, default=4.0, help="l_inf radius in 1/255 units")
    parser.add_argument("--train-steps", type=int, default=5, help="PGD steps per batch")
    parser.add_argument("--eval-steps", type=int, default=50, help="PGD steps when measuring")
    parser.add_argument("--threads", type=int, default=2)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("photos", "digits"), default="photos")
    add_recipe_arguments(parser, epochs=10)
    args = parser.parse_args(list(argv) or None)
    output = Path(args.output or Path(__file__).parent / f"robust_{args.dataset}.onnx")
    check_output_path(output)
    check_output_path(output.with_suffix(".json"))
    record = run(recipe_from_args(args), output)
    accuracy = record["test_accuracy"]
    print(
        f"clean {accuracy['clean_acc']:.4f} robust {accuracy['robust_acc']:.4f} "
        f"train {record['train_seconds']} s"
    )
    for layer in record["kernel_spectra"]:
        print(layer)
    return 0


def run_script(main: Callable[[], int], name: str) -> None:
    """Exit with main()'s status; a GdwsError is one line on stderr and status 1."""
    try:
        sys.exit(main())
    except GdwsError as error:
        sys.exit(f"{name}: error: {error}")


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
