"""--dataset, --limit, --batch-size, --mean, --std for the exits verbs: labelled images,
normalized the way the model expects, fed in batches of --batch-size."""

from __future__ import annotations

from typing import Tuple

import click
import numpy as np

from gdws_deploy.commands.args.base import NUMBERS, ArgGroup, Flags
from gdws_deploy.commands.args.data import DATASET_HELP
from gdws_deploy.errors import GdwsError


class ExitDataArgs(ArgGroup):
    """Builds (images as the model takes them, labels, the dataset spec)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.options = (
            click.option("--dataset", required=True, metavar="SPEC", help=DATASET_HELP),
            click.option("--limit", type=click.IntRange(min=1), help="Use the first N samples."),
            click.option(
                "--batch-size",
                type=click.IntRange(min=1),
                default=batch_size,
                show_default=True,
                help="Samples per batch.",
            ),
            click.option(
                "--mean",
                type=NUMBERS,
                metavar="M[,M...]",
                help="Per-channel mean the model expects.",
            ),
            click.option(
                "--std", type=NUMBERS, metavar="S[,S...]", help="Per-channel std the model expects."
            ),
        )

    @staticmethod
    def build(flags: Flags) -> Tuple[np.ndarray, np.ndarray, str]:
        from gdws_deploy.robustness.data import load_dataset

        data = load_dataset(flags["dataset"], flags["limit"])
        mean, std = flags["mean"] or [0.0], flags["std"] or [1.0]
        for flag, values in (("--mean", mean), ("--std", std)):
            if len(values) not in (1, data.x.shape[1]):
                raise GdwsError(
                    f"{flag} needs 1 or {data.x.shape[1]} values (channels), got {len(values)}"
                )
        if not all(s > 0 for s in std):
            raise GdwsError(f"--std values must be > 0, got {std}")
        shape = (1, -1) + (1,) * (data.x.ndim - 2)
        images = (data.x - np.reshape(mean, shape)) / np.reshape(std, shape)
        return images.astype(np.float32), data.y, data.name
