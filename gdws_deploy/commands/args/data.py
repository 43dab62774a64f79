"""--dataset, --limit, --batch-size, --mean, --std, --seed: the samples a verb measures on
(and, with a DeviceArgs' --device, the device that sizes the default batch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple, TypedDict

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags
from gdws_deploy.runtime.providers import GPU_BATCH_SCALE

if TYPE_CHECKING:
    from gdws_deploy.robustness.data import Dataset

DATASET_HELP = "digits[:train], photos[:train], npz:PATH, cifar10:DIR or svhn:FILE.mat."
Channels = Optional[Tuple[float, ...]]


class Sampling(TypedDict):
    """How a model is fed the samples: keywords of evaluate(), compute_alphas() and
    RobustnessCheck alike."""

    batch_size: int
    mean: Channels
    std: Channels
    seed: int
    device: str


class DataArgs(ArgGroup):
    """Builds the Dataset; `sampling` reads how the model is fed it."""

    def __init__(self, batch_size: int, required: bool = True) -> None:
        self.batch_size = batch_size
        self.options = (
            click.option("--dataset", required=required, metavar="SPEC", help=DATASET_HELP),
            click.option("--limit", type=click.IntRange(min=1), help="Use the first N samples."),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                help=f"[default: {batch_size}, {batch_size * GPU_BATCH_SCALE} on a GPU]",
            ),
            click.option("--mean", metavar="M[,M...]", help="Per-channel mean the model expects."),
            click.option("--std", metavar="S[,S...]", help="Per-channel std the model expects."),
            click.option("--seed", type=int, default=0, show_default=True),
        )

    @staticmethod
    def build(flags: Flags, spec: Optional[str] = None) -> Dataset:
        """The --dataset samples (or those of `spec`, another data flag), cut at --limit."""
        from gdws_deploy.robustness.data import load_dataset

        return load_dataset(spec or flags["dataset"], flags["limit"])

    def sampling(self, flags: Flags) -> Sampling:
        """--batch-size (default: the verb's, scaled on a GPU), --seed, the per-channel
        --mean and --std (None where not given), and the --device resolved (the CPU where
        the verb has no --device)."""
        from gdws_deploy.commands.args.device import DeviceArgs
        from gdws_deploy.robustness.attacks import parse_channels
        from gdws_deploy.robustness.device import default_batch

        mean, std = parse_channels(flags["mean"], "--mean"), parse_channels(flags["std"], "--std")
        device = DeviceArgs.build({"device": flags.get("device", "cpu")})
        return Sampling(
            batch_size=flags["batch_size"] or default_batch(device, self.batch_size),
            mean=tuple(mean) if mean else None,
            std=tuple(std) if std else None,
            seed=flags["seed"],
            device=str(device),
        )
