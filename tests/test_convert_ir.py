"""Models of IR version 3 convert: their rewrite comes out at an IR that allows it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from gdws_deploy.pipeline.convert import convert_file
from tests.cli_run import run_cli
from tests.conv_models import ConvSpec, conv_chain, run


def ir3_model(bias: bool) -> onnx.ModelProto:
    """An IR-3 model (opset 8) whose initializers are not graph inputs: IR 3 asks for
    them there, exporters often left them out, onnxruntime runs it."""
    specs = [ConvSpec(8, bias=bias, name=n) for n in ("stem", "body")]
    model = conv_chain(specs, opset=8)
    model.ir_version = 3
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_ir3_model_converts_at_ir4_with_parity(tmp_path, bias):
    source, output = tmp_path / "old.onnx", tmp_path / "old.gdws.onnx"
    onnx.save(ir3_model(bias), str(source))
    report, written = convert_file(source, output, beta=0.0)
    assert written and report.converted == 1 and report.parity <= 1e-5
    assert report.notes == (
        "IR version 3 -> 4: the rewrite adds initializers, which IR 3 must also list as "
        "graph inputs",
    )
    converted = onnx.load(str(output))
    onnx.checker.check_model(converted, full_check=True)
    assert converted.ir_version == 4 and converted.opset_import[0].version == 8
    assert converted.producer_name == "gdws-tests"
    images = np.random.default_rng(0).standard_normal((2, 4, 12, 12)).astype(np.float32)
    original = run(onnx.load(str(source)), images)
    assert np.abs(run(converted, images) - original).max() <= 1e-5 * np.abs(original).max()


def test_cli_says_the_ir_version_was_upgraded(capsys, tmp_path):
    source = tmp_path / "old.onnx"
    onnx.save(ir3_model(bias=False), str(source))
    result = run_cli(capsys, "convert", source, "--beta", "0")
    assert result.code == 0, result.err
    assert "note: IR version 3 -> 4" in result.err and "Traceback" not in result.err
