"""--dataset, --limit, --batch-size, --mean, --std, --seed: the samples a verb measures on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple, TypedDict

import click

from gdws_deploy.commands.args.base import ArgGroup, Flags

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


class DataArgs(ArgGroup):
    """Builds the Dataset; `sampling` reads how the model is fed it."""

    def __init__(self, batch_size: int, required: bool = True) -> None:
        self.options = (
            click.option("--dataset", required=required, metavar="SPEC", help=DATASET_HELP),
            click.option("--limit", type=click.IntRange(min=1), help="Use the first N samples."),
            click.option(
                "--batch-size", type=click.IntRange(min=1), default=batch_size, show_default=True
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

    @staticmethod
    def sampling(flags: Flags) -> Sampling:
        """--batch-size, --seed, and the per-channel --mean and --std (None where not given)."""
        from gdws_deploy.robustness.attacks import parse_channels

        mean, std = parse_channels(flags["mean"], "--mean"), parse_channels(flags["std"], "--std")
        return Sampling(
            batch_size=flags["batch_size"],
            mean=tuple(mean) if mean else None,
            std=tuple(std) if std else None,
            seed=flags["seed"],
        )
