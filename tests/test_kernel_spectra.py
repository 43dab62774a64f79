from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from gdws_deploy.ir.analyze import analyze
from gdws_deploy.passes.gdws.spectra import onnx_conv_spectra, top_energy_shares
from models.export import export_onnx


def _loop_reference(weight: np.ndarray, top: int) -> np.ndarray:
    """The definition, one channel at a time."""
    shares = []
    for c in range(weight.shape[1]):
        s = np.linalg.svd(weight[:, c].reshape(weight.shape[0], -1), compute_uv=False)
        shares.append(np.cumsum(s**2)[:top] / np.sum(s**2))
    return np.mean(shares, axis=0)


def test_rank_one_channels_put_all_energy_in_the_top_value():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(8, 4, 1)), rng.normal(size=(1, 4, 9))
    weight = (u * v).reshape(8, 4, 3, 3)
    np.testing.assert_allclose(top_energy_shares(weight), [1.0, 1.0, 1.0])


def test_isotropic_kernels_spread_energy_evenly_over_all_nine_values():
    weight = np.tile(np.eye(9).reshape(9, 1, 3, 3), (1, 5, 1, 1))
    np.testing.assert_allclose(top_energy_shares(weight), [1 / 9, 2 / 9, 3 / 9])


def test_shares_match_a_per_channel_svd_and_ignore_the_scale():
    weight = np.random.default_rng(1).normal(size=(16, 6, 3, 3))
    shares = top_energy_shares(weight, top=4)
    np.testing.assert_allclose(shares, _loop_reference(weight, 4), rtol=1e-10)
    np.testing.assert_allclose(top_energy_shares(weight * 7.5, top=4), shares, rtol=1e-10)


def test_all_zero_channels_are_left_out_of_the_mean():
    weight = np.random.default_rng(2).normal(size=(16, 3, 3, 3))
    with_dead = np.concatenate([weight, np.zeros((16, 2, 3, 3))], axis=1)
    np.testing.assert_allclose(top_energy_shares(with_dead), top_energy_shares(weight))


def test_fewer_singular_values_than_asked_count_as_all_the_energy():
    weight = np.random.default_rng(3).normal(size=(2, 4, 3, 3))
    shares = top_energy_shares(weight, top=3)
    assert shares[1] == shares[2] == 1.0


def test_onnx_records_cover_exactly_the_ungrouped_kxk_convs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 16, 1),
        nn.Conv2d(16, 12, (3, 5), padding=(1, 2)),
    ).eval()
    path = export_onnx(model, tmp_path / "convs.onnx", (1, 3, 8, 8))

    records = onnx_conv_spectra(onnx.load(str(path)))

    assert [r["weight_shape"] for r in records] == [[8, 3, 3, 3], [12, 16, 3, 5]]
    for record, conv in zip(records, (model[0], model[3])):
        expected = top_energy_shares(conv.weight.detach().numpy())
        got = [record["top1"], record["top2"], record["top3"]]
        np.testing.assert_allclose(got, expected, atol=5e-5)


def test_an_analyzed_model_gives_the_records_of_its_selection(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)).eval()
    path = export_onnx(model, tmp_path / "three.onnx", (1, 3, 12, 12))
    proto = onnx.load(str(path))
    every = onnx_conv_spectra(proto)
    chosen = onnx_conv_spectra(analyze(proto, exclude=[every[2]["name"]]))
    assert len(every) == 3 and chosen == every[1:2]  # the first conv and the excluded one left
