"""The photo-patch task as a named dataset: splits, and a --limit prefix that is balanced."""

from __future__ import annotations

import numpy as np
import pytest

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.photo_patches import CLASS_NAMES, load_photo_patches


def test_photos_spec_is_the_test_split_dealt_out_class_by_class():
    dataset = load_dataset("photos", limit=50)
    x_test, y_test = load_photo_patches("test")
    assert dataset.x.shape == (50, 1, 32, 32)
    np.testing.assert_array_equal(np.bincount(dataset.y), np.full(len(CLASS_NAMES), 5))
    # every sample is a test patch of its labelled photo
    for image, label in zip(dataset.x, dataset.y):
        assert np.any(np.all(x_test[y_test == label] == image, axis=(1, 2, 3)))


def test_photos_train_split_is_separate_and_larger():
    train, test = load_dataset("photos:train"), load_dataset("photos")
    assert len(train) == 3 * len(test) == 6000
    assert not np.array_equal(train.x[:10], test.x[:10])


def test_unknown_photos_split_is_one_clear_error():
    with pytest.raises(GdwsError, match="split 'validation'"):
        load_dataset("photos:validation")
