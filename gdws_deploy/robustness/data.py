"""Evaluation data: images (N, C, H, W) float32 in [0, 1] and labels (N,) int64.

A dataset is named by a spec string, `name` or `name:argument`:
  digits          sklearn's bundled 8x8 digits, test split (`digits:train` for the rest)
  photos          32x32 grayscale patches of scikit-image's photographs, test split
                  (`photos:train` for the other half of each photo), classes interleaved
  npz:PATH        arrays `x` (N, C, H, W) float in [0, 1] (or uint8, scaled by 1/255)
                  and `y` (N,) int
  cifar10:DIR     the python pickle batches (DIR/test_batch or DIR/cifar-10-batches-py/...)
  svhn:FILE.mat   the cropped-digits .mat file (X: 32x32x3xN uint8, y: N x 1, 10 meaning 0)
More names plug in with `register_dataset(name, loader)`. Everything a user can get wrong
(missing file, wrong arrays, values outside [0, 1], labels or shapes the model cannot
take) is a GdwsError.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from gdws_deploy.errors import GdwsError

Arrays = Tuple[np.ndarray, np.ndarray]
# loader(argument after "name:", or None) -> (x, y); validated by load_dataset
Loader = Callable[[Optional[str]], Arrays]
Dim = Union[int, str, None]


@dataclass(frozen=True)
class Dataset:
    """Validated images and labels; `name` is the spec it was loaded from."""

    name: str
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def limit(self, count: Optional[int]) -> Dataset:
        """The first `count` samples (all when None); asking for more than there are
        takes all of them and says so on stderr, so a result is never read as bigger."""
        if count is None:
            return self
        if count < 1:
            raise GdwsError(f"--limit must be >= 1, got {count}")
        if count > len(self):
            print(
                f"--limit {count} > {len(self)} samples in {self.name}: using all {len(self)}",
                file=sys.stderr,
            )
        kept = Dataset(self.name, self.x[:count], self.y[:count])
        classes, held = np.unique(self.y).size, np.unique(kept.y).size
        ordered = bool(np.all(np.diff(kept.y) >= 0))
        if ordered and held < min(classes, len(kept)):  # a file stored class by class
            print(
                f"--limit {count}: the first {len(kept)} samples of {self.name} hold only "
                f"{held} of its {classes} classes (is it ordered by class?)",
                file=sys.stderr,
            )
        return kept

    def batches(self, batch_size: int) -> Iterator[Arrays]:
        if batch_size < 1:
            raise GdwsError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def check_model(
        self, input_shape: Sequence[Dim], count_classes: Callable[[np.ndarray], int]
    ) -> None:
        """GdwsError unless the model takes these images and has a class for every label.

        input_shape: the model's declared input dims; count_classes(first image batch)
        runs the model once, after the shape has been found to fit.
        """
        expected = list(input_shape[1:])
        actual = list(self.x.shape[1:])
        fits = len(expected) == len(actual) and all(
            not isinstance(e, int) or e == a for e, a in zip(expected, actual)
        )
        if not fits:
            shown = ", ".join(str(e) if isinstance(e, int) else "?" for e in expected)
            raise GdwsError(
                f"dataset {self.name} has images of shape {tuple(actual)}, "
                f"the model takes ({shown})"
            )
        num_classes = count_classes(self.x[:1])
        if self.y.max(initial=0) >= num_classes:
            raise GdwsError(
                f"dataset {self.name} has label {int(self.y.max())}, the model has only "
                f"{num_classes} classes"
            )


_LOADERS: Dict[str, Loader] = {}


def register_dataset(name: str, loader: Loader) -> None:
    """Make `name` (and `name:argument`) a dataset spec."""
    if not name or ":" in name:
        raise ValueError(f"bad dataset name {name!r}")
    _LOADERS[name] = loader


def dataset_names() -> Tuple[str, ...]:
    return tuple(sorted(_LOADERS))


def load_dataset(spec: str, limit: Optional[int] = None) -> Dataset:
    """The dataset named by `spec`, validated, cut to `limit` samples."""
    name, _, argument = spec.partition(":")
    if name not in _LOADERS:
        raise GdwsError(f"unknown dataset {spec!r}; known: {', '.join(dataset_names())}")
    x, y = _LOADERS[name](argument or None)
    return Dataset(spec, *_validated(spec, x, y)).limit(limit)


def _validated(spec: str, x: np.ndarray, y: np.ndarray) -> Arrays:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4:
        raise GdwsError(f"dataset {spec}: images must be (N, C, H, W), got shape {x.shape}")
    if x.dtype.kind != "f":
        raise GdwsError(f"dataset {spec}: images must be floats in [0, 1], got {x.dtype}")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise GdwsError(
            f"dataset {spec}: labels must be a 1-D integer array, got {y.dtype} {y.shape}"
        )
    if len(x) != len(y):
        raise GdwsError(f"dataset {spec}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise GdwsError(f"dataset {spec} is empty")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise GdwsError(
            f"dataset {spec}: pixel values must lie in [0, 1] (found {x.min():g} .. {x.max():g})"
        )
    if y.min() < 0:
        raise GdwsError(f"dataset {spec}: negative label {int(y.min())}")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def _existing(argument: Optional[str], what: str) -> Path:
    if not argument:
        raise GdwsError(f"give the {what}, e.g. {what.split()[0]}:PATH")
    path = Path(argument).expanduser()
    if not path.exists():
        raise GdwsError(f"{path} does not exist")
    return path


# ----------------------------------------------------------------------------------------
# Built-in datasets


def _digits(split: Optional[str]) -> Arrays:
    """sklearn's 1797 digits; every third sample (index % 3 == 2) is the test split.

    The file cycles through the classes, so this fixed rule keeps both splits balanced.
    """
    from sklearn.datasets import load_digits

    split = split or "test"
    if split not in ("train", "test"):
        raise GdwsError(f"digits split must be train or test, got {split!r}")
    digits = load_digits()
    chosen = (np.arange(len(digits.target)) % 3 == 2) == (split == "test")
    images = digits.images[chosen][:, None] / 16.0
    return images.astype(np.float32), digits.target[chosen]


def _photos(split: Optional[str]) -> Arrays:
    """The photo-patch task of the bundled robust model (gdws_deploy.robustness.photo_patches).

    The loader groups patches by class in raster order; they are dealt out class by class
    from a fixed shuffle, so any first N (--limit) is balanced and spread over each photo.
    """
    from gdws_deploy.robustness.photo_patches import load_photo_patches

    images, labels = load_photo_patches(split or "test")
    order = _dealt_by_class(labels, np.random.default_rng(0))
    return images[order], labels[order]


def _dealt_by_class(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices taking one sample of each class in turn, each class in a shuffled order."""
    shuffled = rng.permutation(len(labels))
    grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]
    grouped_labels = labels[grouped]
    rank_in_class = np.arange(len(labels)) - np.searchsorted(grouped_labels, grouped_labels)
    return grouped[np.argsort(rank_in_class, kind="stable")]


def _npz(argument: Optional[str]) -> Arrays:
    """x and y of an npz archive; uint8 images (how CIFAR/SVHN arrays are often kept) are
    scaled to [0, 1], and the user is told, since a float model sees other numbers."""
    path = _existing(argument, "npz file")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle and say so
        raise GdwsError(f"{path} is not an npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise GdwsError(f"{path} has no array named {sorted(missing)[0]!r} (needs x and y)")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise GdwsError(f"cannot read {path} as .npz: {error}") from error
    if x.dtype == np.uint8:
        print(f"npz:{argument}: uint8 images scaled by 1/255", file=sys.stderr)
        x = x.astype(np.float32) / np.float32(255)
    return x, y


def _cifar10(argument: Optional[str]) -> Arrays:
    folder = _existing(argument, "cifar10 directory")
    candidates = [folder / "test_batch", folder / "cifar-10-batches-py" / "test_batch"]
    batch = next((c for c in candidates if c.is_file()), None)
    if batch is None:
        raise GdwsError(f"no CIFAR-10 test_batch in {folder}")
    try:
        with open(batch, "rb") as handle:
            content = pickle.load(handle, encoding="bytes")
        data = np.asarray(content[b"data"], dtype=np.uint8)
        labels = np.asarray(content[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise GdwsError(f"{batch} is not a CIFAR-10 python batch: {error}") from error
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise GdwsError(f"{batch}: data must be (N, 3072) uint8, got {data.shape}")
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels


def _svhn(argument: Optional[str]) -> Arrays:
    from scipy.io import loadmat

    path = _existing(argument, "svhn .mat file")
    try:
        content = loadmat(str(path))
        images, labels = content["X"], np.asarray(content["y"]).reshape(-1)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as error:
        raise GdwsError(f"{path} is not an SVHN .mat file (needs X and y): {error}") from error
    if images.ndim != 4 or images.shape[2] != 3:
        raise GdwsError(f"{path}: X must be 32x32x3xN, got {images.shape}")
    x = images.transpose(3, 2, 0, 1).astype(np.float32) / 255.0
    return x, np.where(labels == 10, 0, labels).astype(np.int64)


register_dataset("digits", _digits)
register_dataset("photos", _photos)
register_dataset("npz", _npz)
register_dataset("cifar10", _cifar10)
register_dataset("svhn", _svhn)
