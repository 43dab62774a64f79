"""Photo-patch classification: real natural-image data that ships offline.

The task is "which of ten photographs is this 32x32 grayscale patch from", built from the
photographs bundled inside scikit-image. A robust CNN trained on it learns the structured,
low-rank 3x3 kernels of robust CIFAR/ImageNet models, which sklearn's digits do not give
(see DESIGN.md, "Kernel structure decides what GDWS can do"). Train patches come from the
left half of each photo and test patches from the right half, so no pixel is in both.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError

# Natural photographs only: skimage's synthetic or binary images (horse, checkerboard,
# binary_blobs) would give patches classifiable by their value range alone.
CLASS_NAMES: Tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "moon",
    "rocket",
)
PATCH_SIZE = 32
# Candidate windows every STRIDE pixels; PER_CLASS[split] of them, evenly spread over the
# half in raster order, are kept so every class has the same number of samples.
STRIDE = 4
PER_CLASS: Dict[str, int] = {"train": 600, "test": 200}
SPLIT_HALF = {"train": 0, "test": 1}


def load_photo_patches(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Patches and labels of one split, identical on every call and machine.

    Returns images (N, 1, 32, 32) float32 in [0, 1] and labels (N,) int64, the index of
    the source photo in CLASS_NAMES; N = 10 * PER_CLASS[split], grouped by class.
    """
    if split not in PER_CLASS:
        raise GdwsError(f"unknown photo-patch split {split!r}; choose from {sorted(PER_CLASS)}")
    patches = [
        _spread_patches(_half(_grayscale(name), SPLIT_HALF[split]), PER_CLASS[split])
        for name in CLASS_NAMES
    ]
    images = np.concatenate(patches)[:, None].astype(np.float32)
    labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), PER_CLASS[split])
    return images, labels


def _grayscale(name: str) -> np.ndarray:
    """One bundled photograph as float64 (H, W) in [0, 1]."""
    from skimage import color, data, util

    image = util.img_as_float(getattr(data, name)())
    return color.rgb2gray(image) if image.ndim == 3 else image


def _half(image: np.ndarray, index: int) -> np.ndarray:
    """Left (index 0) or right (index 1) half of `image`, split between columns."""
    middle = image.shape[1] // 2
    return image[:, :middle] if index == 0 else image[:, middle:]


def _spread_patches(image: np.ndarray, count: int) -> np.ndarray:
    """`count` PATCH_SIZE windows of `image` on a STRIDE grid, evenly spread, (count, P, P)."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (PATCH_SIZE, PATCH_SIZE))
    grid = windows[::STRIDE, ::STRIDE]
    rows, cols = grid.shape[:2]
    if rows * cols < count:
        raise GdwsError(f"a {image.shape} half-photo holds {rows * cols} patches, need {count}")
    chosen = np.linspace(0, rows * cols - 1, count).round().astype(np.int64)
    return grid[chosen // cols, chosen % cols]
