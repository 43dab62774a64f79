"""The samples static INT8 calibration runs on: a seeded draw of a dataset's images, fed as
the model sees them."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from gdws_deploy.errors import GdwsError


def calibration_samples(
    images: np.ndarray,
    limit: int,
    seed: int = 0,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """`limit` of `images` (N, C, H, W) in [0, 1] (all when there are fewer), drawn at
    random with `seed` and kept in their order, then normalized as the model expects,
    (x - mean) / std per channel (one value or one per channel), as float32.

    Drawn, not the first `limit`: data stored class by class would calibrate the
    activation ranges on a few classes only.
    """
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images))[:limit])
    samples = images[chosen].astype(np.float32)
    if not mean and not std:
        return samples
    channels = samples.shape[1]
    values = {"mean": list(mean or [0.0]), "std": list(std or [1.0])}
    for what, given in values.items():
        if len(given) not in (1, channels):
            raise GdwsError(
                f"--{what} has {len(given)} values, the images have {channels} channels"
            )
    if min(values["std"]) <= 0:
        raise GdwsError(f"std must be positive, got {values['std']}")
    shape = (1, -1) + (1,) * (samples.ndim - 2)
    centred = samples - np.reshape(values["mean"], shape).astype(np.float32)
    return centred / np.reshape(values["std"], shape).astype(np.float32)
