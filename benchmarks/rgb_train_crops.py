"""Training crops for the shared VGG-16: seeded 32x32 crops of the left 70 % of each photo.

The shared data holds the photographs (photos_rgb.npz) and 500 training crops; a fine-tune
wants more. These come from the same region the network was trained on (the left 70 %;
the test crops come from the right 30 %), 1,000 per class, as uint8 N x 3 x 32 x 32 with
int64 labels in the class order of robust_vgg16_photos.json, written atomically.

    python benchmarks/rgb_train_crops.py ../shared/models/photos_rgb.npz -o rgb_train.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdws_deploy.atomic import atomic_path

CROP = 32
TRAIN_SHARE = 0.7


def crops(photo: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random CROP x CROP crops (N, 3, CROP, CROP) of the photo's left TRAIN_SHARE."""
    height, width, _ = photo.shape
    rows = rng.integers(0, height - CROP + 1, count)[:, None] + np.arange(CROP)
    cols = rng.integers(0, int(width * TRAIN_SHARE) - CROP + 1, count)[:, None] + np.arange(CROP)
    return photo[rows[:, :, None], cols[:, None, :]].transpose(0, 3, 1, 2)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="photos_rgb.npz")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) or None)
    record = json.loads((args.photos.parent / "robust_vgg16_photos.json").read_text())
    photos = np.load(args.photos)
    rng = np.random.default_rng(args.seed)
    x = np.concatenate([crops(photos[name], args.per_class, rng) for name in record["classes"]])
    y = np.repeat(np.arange(len(record["classes"]), dtype=np.int64), args.per_class)
    order = rng.permutation(len(y))
    with atomic_path(args.output) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, x=x[order], y=y[order])
    print(f"wrote {args.output}: {len(y)} crops")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
