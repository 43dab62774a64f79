"""INT8 calibration feed and cache, on real images (sklearn's bundled 8x8 digits)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.calibration import CalibrationFeed, read_cache, write_cache
from tests.cli_run import assert_one_line_error, run_cli
from tests.runtime_models import small_cnn


@pytest.fixture(scope="module")
def digits():
    images = load_digits().images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    return images[:, None]  # NCHW with one channel


def chunks(array, size):
    return [array[i : i + size] for i in range(0, len(array), size)]


def test_feed_regroups_any_batch_sizes_into_exact_calibration_batches(digits):
    feed = CalibrationFeed(chunks(digits[:100], 7), (16, 1, 8, 8))
    batches = list(feed)
    assert len(batches) == 6 and feed.served == 6 and feed.dropped_samples == 4
    assert all(b.shape == (16, 1, 8, 8) and b.dtype == np.float32 for b in batches)
    assert all(b.flags["C_CONTIGUOUS"] for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), digits[:96].astype(np.float32))


def test_feed_stops_after_the_batch_limit_without_reading_everything(digits):
    consumed = []

    def source():
        for chunk in chunks(digits, 50):
            consumed.append(len(chunk))
            yield chunk

    feed = CalibrationFeed(source(), (32, 1, 8, 8), max_batches=3)
    batches = list(feed)
    assert len(batches) == 3 and feed.served == 3
    assert sum(consumed) == 100  # 96 samples needed: two chunks of 50
    np.testing.assert_array_equal(batches[-1], digits[64:96].astype(np.float32))


def test_feed_accepts_single_samples_and_labelled_pairs(digits):
    labels = np.arange(len(digits))
    singles = CalibrationFeed(list(digits[:8]), (4, 1, 8, 8))
    pairs = CalibrationFeed(zip(chunks(digits[:8], 3), chunks(labels[:8], 3)), (4, 1, 8, 8))
    for feed in (singles, pairs):
        np.testing.assert_array_equal(np.concatenate(list(feed)), digits[:8].astype(np.float32))


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((4, 3, 8, 8)), "does not fit the model input 4x1x8x8"),
        (np.full((4, 1, 8, 8), np.nan), "NaN or infinite"),
        (np.array([["a"] * 8] * 8), "not numeric"),
    ],
)
def test_unusable_calibration_data_is_a_clear_error(batch, message):
    with pytest.raises(GdwsError, match=message):
        list(CalibrationFeed([batch], (4, 1, 8, 8)))


def test_batch_limit_must_be_positive():
    with pytest.raises(GdwsError, match="--calib-batches"):
        CalibrationFeed([], (4, 1, 8, 8), max_batches=0)


def test_cache_round_trips_and_absent_cache_means_calibrate(tmp_path):
    path = tmp_path / "calib.cache"
    assert read_cache(None) is None and read_cache(path) is None
    write_cache(path, memoryview(b"TRT-8502-EntropyCalibration2\ninput: 3c010a14\n"))
    assert read_cache(path) == b"TRT-8502-EntropyCalibration2\ninput: 3c010a14\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.cache"]  # no temp files left
    path.write_bytes(b"")
    assert read_cache(path) is None


def test_unreadable_calibration_data_stops_the_build_in_one_line(tmp_path, capsys):
    model = small_cnn(tmp_path / "cnn.onnx", in_channels=1, size=8)
    missing = tmp_path / "calib.npz"
    done = run_cli(
        capsys, "build", model, "-o", tmp_path / "m.plan", "--int8", "--calib", f"npz:{missing}"
    )
    assert_one_line_error(done, "calib.npz")
    done = run_cli(capsys, "build", model, "-o", tmp_path / "m.plan", "--calib", "digits")
    assert_one_line_error(done, "--calib only applies together with --int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]
