"""The tuner's TensorRT backend on a real GPU; skipped where there is none."""

from __future__ import annotations

import pytest

from gdws_deploy.cost_model import CostModel, Form, LayerShape
from gdws_deploy.graph import check_and_infer
from gdws_deploy.measure import TrtBackend
from tests.conv_models import ConvSpec, conv_chain
from tests.test_runtime_gpu import gpu  # noqa: F401 (the module's skip-unless-GPU fixture)

pytestmark = pytest.mark.gpu


def test_tensorrt_backend_times_every_form_of_a_layer():
    model = conv_chain([ConvSpec(16, pads=(1, 1, 1, 1)), ConvSpec(16, pads=(1, 1, 1, 1))])
    types = check_and_infer(model)
    shape = LayerShape.of(model.graph.node[2], types)
    costs = CostModel(TrtBackend(), batch=4)
    for form in (Form("dense"), Form("gather", 24, 2), Form("pad", 24, 2), Form("fold", 8, 1)):
        assert costs.seconds(shape, form) > 0
    assert costs.describe().startswith("tensorrt-")
