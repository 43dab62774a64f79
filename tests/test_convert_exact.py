"""`beta = 0` means exact: kernels of exact low rank are rewritten, round-off is no error."""

from __future__ import annotations

import numpy as np
import pytest

from gdws_deploy import convert
from gdws_deploy.passes.gdws.decompose import ChannelSpectra, lego, mego
from tests.conv_models import ConvSpec, conv_chain, conv_weight, node_names


def test_beta_zero_rewrites_kernels_of_exact_rank_two_with_parity_within_1e5():
    specs = [ConvSpec(8, weights="rank2", pads=(1, 1, 1, 1), name=n) for n in ("stem", "body")]
    model = conv_chain(specs, input_shape=(8, 12, 12))
    converted, report = convert(model, beta=0.0, all_layers=True)
    assert [row.kernels for row in report.layers] == [2 * 8, 2 * 8]
    assert report.macs_after < report.macs_before
    assert report.parity <= 1e-5
    assert {"stem/gdws_pw", "body/gdws_pw"} <= set(node_names(converted))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_round_off_of_a_stored_rank_r_weight_is_not_error(dtype):
    """Rounding a rank-2 weight to its dtype leaves energy beyond rank 2 that is round-off:
    LEGO at beta 0 and MEGO with room to spare both keep exactly 2 terms per channel."""
    rng = np.random.default_rng(3)
    columns, kernels = rng.standard_normal((6, 16, 2)), rng.standard_normal((6, 2, 9))
    weight = (columns @ kernels).reshape(6, 16, 3, 3).transpose(1, 0, 2, 3).astype(dtype)
    spectra = ChannelSpectra.from_weight(weight)
    tail = float(np.sum(spectra.s[:, 2:] ** 2))
    assert 0 < tail <= spectra.round_off_energy()
    assert lego(spectra, 0.0).kernels_per_channel().tolist() == [2] * 6
    assert mego(spectra, 40).kernels_per_channel().tolist() == [2] * 6
    # full-rank weights keep every term: round-off is far below any real singular value
    full = ChannelSpectra.from_weight(
        conv_weight((16, 6, 3, 3), "random", np.random.default_rng(4)).astype(dtype)
    )
    assert lego(full, 0.0).kernels == 6 * 9
