from __future__ import annotations

import numpy as np
import pytest
from skimage import color, data, util

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.photo_patches import (
    CLASS_NAMES,
    PATCH_SIZE,
    PER_CLASS,
    load_photo_patches,
)


@pytest.fixture(scope="module")
def splits():
    return {split: load_photo_patches(split) for split in PER_CLASS}


def _photo(name: str) -> np.ndarray:
    image = util.img_as_float(getattr(data, name)())
    return color.rgb2gray(image) if image.ndim == 3 else image


def _window_positions(patches: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(N, 2) top-left (row, col) of a P x P window of `image` equal to each (P, P) patch,
    (-1, -1) where there is none.

    Index every horizontal run of P pixels of `image` by its bytes, look each patch's
    top row up there, and compare the whole window at every candidate position.
    """
    rows = image.shape[0] - PATCH_SIZE + 1
    runs = np.lib.stride_tricks.sliding_window_view(image[: rows + PATCH_SIZE - 1], PATCH_SIZE, 1)
    where = {}
    for row, col in np.ndindex(rows, runs.shape[1]):
        where.setdefault(runs[row, col].tobytes(), []).append((row, col))
    positions = []
    for patch in patches.astype(np.float64):
        spots = where.get(patch[0].tobytes(), [])
        window = (image[r : r + PATCH_SIZE, c : c + PATCH_SIZE] for r, c in spots)
        matches = [spot for spot, w in zip(spots, window) if np.array_equal(w, patch)]
        positions.append(matches[0] if matches else (-1, -1))
    return np.array(positions)


def test_splits_have_the_documented_shapes_types_and_range(splits):
    for split, (images, labels) in splits.items():
        count = len(CLASS_NAMES) * PER_CLASS[split]
        assert images.shape == (count, 1, PATCH_SIZE, PATCH_SIZE)
        assert images.dtype == np.float32 and labels.dtype == np.int64
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert np.array_equal(np.bincount(labels), np.full(len(CLASS_NAMES), PER_CLASS[split]))


def test_loading_again_gives_identical_arrays(splits):
    images, labels = load_photo_patches("test")
    assert np.array_equal(images, splits["test"][0])
    assert np.array_equal(labels, splits["test"][1])


def test_no_patch_is_in_both_splits(splits):
    train = {row.tobytes() for row in splits["train"][0]}
    assert not any(row.tobytes() in train for row in splits["test"][0])


def test_train_patches_come_from_the_left_half_and_test_patches_from_the_right(splits):
    for name in ("camera", "chelsea", "coins"):
        label = CLASS_NAMES.index(name)
        # Patches are stored as float32: compare with the photo rounded the same way.
        photo = _photo(name).astype(np.float32).astype(np.float64)
        middle = photo.shape[1] // 2
        for split, half in (("train", photo[:, :middle]), ("test", photo[:, middle:])):
            images, labels = splits[split]
            positions = _window_positions(images[labels == label, 0], half)
            assert (positions >= 0).all(), f"{name} {split} patch not found in its half"
            # Spread over the whole half, not bunched at its top.
            span = positions.max(axis=0) - positions.min(axis=0)
            assert (span >= 0.75 * (np.array(half.shape) - PATCH_SIZE)).all()


def test_unknown_split_is_a_user_error():
    with pytest.raises(GdwsError, match="unknown photo-patch split 'validation'"):
        load_photo_patches("validation")
