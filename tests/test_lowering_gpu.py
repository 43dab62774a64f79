"""The tuner's TensorRT backend on a real GPU; skipped where there is none."""

from __future__ import annotations

import pytest

from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import check_and_infer
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.passes.gdws.decompose import ChannelSpectra
from gdws_deploy.speed import context_timing
from gdws_deploy.speed.backends import TrtBackend
from gdws_deploy.speed.cost_model import CostModel, LayerShape, LoweringForm
from tests.conv_models import ConvSpec, conv_chain
from tests.test_lowering import tuning_model
from tests.test_runtime_gpu import gpu  # noqa: F401 (the module's skip-unless-GPU fixture)

pytestmark = pytest.mark.gpu


def test_tensorrt_backend_times_every_form_of_a_layer():
    model = conv_chain([ConvSpec(16, pads=(1, 1, 1, 1)), ConvSpec(16, pads=(1, 1, 1, 1))])
    types = check_and_infer(model)
    shape = LayerShape.of(model.graph.node[2], types)
    costs = CostModel(TrtBackend(), batch=4)
    for form in (
        LoweringForm("dense"),
        LoweringForm("gather", 24, 2),
        LoweringForm("pad", 24, 2),
        LoweringForm("fold", 8, 1),
    ):
        assert costs.seconds(shape, form) > 0
    assert costs.describe().startswith("tensorrt-")


def test_tensorrt_layer_profiler_charges_time_to_the_layers_in_context():
    model = tuning_model()
    analyzed = GdwsPass().select(analyze(model, all_layers=True))
    layers = analyzed.eligible
    spectra = {layer.name: ChannelSpectra.from_weight(layer.weight) for layer in layers}
    timer = context_timing.ContextTimer(TrtBackend(), 4, analyzed, layers, spectra)
    dense = timer.seconds(context_timing.OptionForm("dense"))
    one = timer.seconds(context_timing.OptionForm("sum", 1))
    assert dense["big"] > 0 and one["big"] > 0 and context_timing.FIXED in dense
