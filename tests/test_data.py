"""Datasets load from their real file formats and refuse what a model cannot take."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.io import savemat

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness import data as data_module
from gdws_deploy.robustness.data import Dataset, load_dataset, register_dataset

RNG = np.random.default_rng(0)


def test_digits_split_is_fixed_disjoint_and_balanced():
    test, train = load_dataset("digits"), load_dataset("digits:train")
    assert test.x.shape == (599, 1, 8, 8) and train.x.shape == (1198, 1, 8, 8)
    assert test.x.dtype == np.float32 and test.x.min() == 0 and test.x.max() == 1
    assert set(np.bincount(test.y)) <= set(range(50, 70))
    assert not {x.tobytes() for x in test.x[:50]} & {x.tobytes() for x in train.x}
    np.testing.assert_array_equal(load_dataset("digits").y, test.y)


def test_npz_round_trips_and_limit_keeps_the_first_samples(tmp_path):
    x = RNG.random((7, 3, 4, 4)).astype(np.float32)
    y = np.arange(7) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}", limit=5)
    np.testing.assert_array_equal(data.x, x[:5])
    np.testing.assert_array_equal(data.y, y[:5])
    assert [len(b[1]) for b in data.batches(2)] == [2, 2, 1]


def test_uint8_npz_images_are_scaled_by_1_over_255_and_said_once(tmp_path, capsys):
    images = RNG.integers(0, 256, (3, 3, 4, 4), dtype=np.uint8)
    path = tmp_path / "cifar_like.npz"
    np.savez(path, x=images, y=np.array([2, 0, 1]))
    data = load_dataset(f"npz:{path}")
    assert data.x.dtype == np.float32
    np.testing.assert_allclose(data.x, images / 255.0, rtol=1e-6)
    assert capsys.readouterr().err.splitlines() == [f"npz:{path}: uint8 images scaled by 1/255"]


def test_text_file_given_as_npz_is_not_an_npz_archive(tmp_path):
    path = tmp_path / "labels.npz"
    path.write_text("0,1,2\n3,4,5\n")
    with pytest.raises(GdwsError) as error:
        load_dataset(f"npz:{path}")
    assert str(error.value) == f"{path} is not an npz archive"


def test_cifar10_pickle_batches_are_decoded_channel_first(tmp_path):
    images = RNG.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": images.reshape(5, -1), b"labels": [3, 1, 4, 1, 5]}, handle)
    data = load_dataset(f"cifar10:{tmp_path}")
    np.testing.assert_allclose(data.x, images / 255.0, rtol=1e-6)
    assert data.y.tolist() == [3, 1, 4, 1, 5]


def test_svhn_mat_is_transposed_and_label_10_means_0(tmp_path):
    images = RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": images, "y": np.array([[10], [1], [9], [10]])})
    data = load_dataset(f"svhn:{tmp_path / 'test_32x32.mat'}")
    assert data.x.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(data.x[2, 1], images[:, :, 1, 2] / 255.0, rtol=1e-6)
    assert data.y.tolist() == [0, 1, 9, 0]


def test_registered_loader_becomes_a_dataset_name(monkeypatch):
    monkeypatch.setattr(data_module, "_LOADERS", dict(data_module._LOADERS))
    register_dataset(
        "ones", lambda arg: (np.ones((int(arg or 2), 1, 2, 2)), np.zeros(int(arg or 2), int))
    )
    assert len(load_dataset("ones:3")) == 3
    assert load_dataset("ones").x.dtype == np.float32


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.full((2, 1, 2, 2), 1.5), [0, 1], "must lie in [0, 1]"),
        (np.full((2, 1, 2, 2), np.nan), [0, 1], "must lie in [0, 1]"),
        (np.zeros((2, 4)), [0, 1], "(N, C, H, W)"),
        (np.zeros((2, 1, 2, 2), np.int32), [0, 1], "floats in [0, 1]"),
        (np.zeros((2, 1, 2, 2)), [0, 1, 1], "2 images but 3 labels"),
        (np.zeros((2, 1, 2, 2)), [0, -1], "negative label"),
        (np.zeros((2, 1, 2, 2)), [0.5, 1.0], "integer"),
    ],
)
def test_bad_npz_contents_are_refused(tmp_path, x, y, message):
    np.savez(tmp_path / "bad.npz", x=x, y=np.asarray(y))
    with pytest.raises(GdwsError) as error:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    assert message in str(error.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("npz:{tmp}/absent.npz", "does not exist"),
        ("cifar10:{tmp}", "no CIFAR-10 test_batch"),
        ("svhn:{tmp}/absent.mat", "does not exist"),
        ("svhn:{tmp}/x.npz", "not an SVHN .mat file"),
        ("npz:{tmp}/x.npz", "no array named 'y'"),
        ("imagenet", "unknown dataset"),
        ("npz", "give the npz file"),
    ],
)
def test_missing_or_wrong_files_are_user_errors(tmp_path, spec, message):
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 1, 2, 2)))
    with pytest.raises(GdwsError, match=message):
        load_dataset(spec.format(tmp=tmp_path))


def test_model_compatibility_checks_shape_and_labels():
    data = Dataset("t", np.zeros((3, 1, 8, 8), np.float32), np.array([0, 4, 9]))
    ten, five = (lambda sample: 10), (lambda sample: 5)
    data.check_model(["batch", 1, 8, 8], ten)
    data.check_model([None, "c", 8, 8], ten)
    with pytest.raises(GdwsError, match=r"shape \(1, 8, 8\), the model takes \(3, 32, 32\)"):
        data.check_model(["batch", 3, 32, 32], ten)
    with pytest.raises(GdwsError, match="label 9, the model has only 5 classes"):
        data.check_model(["batch", 1, 8, 8], five)
