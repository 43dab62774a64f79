"""Weight error vectors: the batched computation is eq. (8), term for term."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import load_model
from gdws_deploy.robustness.alphas import (
    SETTINGS_KEY,
    AlphaSums,
    accumulate_alphas,
    accumulate_alphas_by_loop,
    compute_alphas,
    eligible_convs,
    load_alphas,
    save_alphas,
)
from gdws_deploy.robustness.attacks import Normalized, make_attacks
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.mirror import OnnxMirror
from tests.cli_run import assert_one_line_error, run_cli
from tests.conv_models import ConvSpec, conv_chain
from tests.digits_fixtures import export_trained_digits_cnn, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    return export_trained_digits_cnn(tmp_path_factory.mktemp("alphas") / "digits.onnx")


def _alphas_both_ways(model_proto: onnx.ModelProto, x: torch.Tensor, wrap=None):
    mirror = OnnxMirror(model_proto)
    model = wrap(mirror) if wrap else mirror
    convs = eligible_convs(model_proto)
    batched, looped = AlphaSums(), AlphaSums()
    accumulate_alphas(model, mirror, convs, x, batched)
    accumulate_alphas_by_loop(model, mirror, convs, x, looped)
    return convs, batched, looped


def test_batched_alphas_equal_the_per_sample_loop_on_a_bn_cnn(digits_model):
    """The first layer takes the direct product form, the second the Gram form."""
    x = torch.from_numpy(load_dataset("digits", limit=12).x)
    normalize = lambda mirror: Normalized(mirror, [0.2], [0.4])  # noqa: E731
    convs, batched, looped = _alphas_both_ways(onnx.load(str(digits_model)), x, normalize)
    assert [c.weight_shape for c in convs] == [(8, 1, 3, 3), (16, 8, 3, 3)]
    assert batched.count == looped.count == 12 * 9
    for conv in convs:
        np.testing.assert_allclose(
            batched.alphas()[conv.name], looped.alphas()[conv.name], rtol=1e-4
        )
        assert (batched.alphas()[conv.name] > 0).all()


def test_batched_alphas_follow_strides_dilations_and_padding():
    specs = [
        ConvSpec(6, strides=(2, 2), auto_pad="SAME_UPPER", weights="random"),
        ConvSpec(5, kernel=(3, 2), dilations=(2, 1), pads=(1, 0, 2, 1), weights="random"),
        ConvSpec(7, kernel=(2, 2), strides=(1, 2), weights="random", bias=False),
    ]
    model = conv_chain(specs, input_shape=(3, 11, 10), dense_head=True, seed=4)
    for node in model.graph.node:  # unnamed nodes: keys are graph.node_name's stand-ins
        node.name = ""
    x = torch.rand(5, 3, 11, 10, generator=torch.Generator().manual_seed(0))
    convs, batched, looped = _alphas_both_ways(model, x)
    assert [conv.name for conv in convs] == ["Conv_0", "Conv_2", "Conv_4"]
    for conv in convs:
        np.testing.assert_allclose(
            batched.alphas()[conv.name], looped.alphas()[conv.name], rtol=1e-4
        )


def test_alphas_file_holds_one_vector_per_eligible_conv_and_the_settings(digits_model, tmp_path):
    data = load_dataset("digits", limit=24)
    (attack,) = make_attacks("pgd-linf", {"*": 8 / 255}, steps=3)
    run = compute_alphas(digits_model, data, attack, batch_size=10, seed=3)
    out = save_alphas(run, tmp_path / "alphas.npz", digits_model)
    with np.load(out) as archive:
        settings = json.loads(str(archive[SETTINGS_KEY]))
        assert set(archive.files) == {"/0/Conv", "/3/Conv", SETTINGS_KEY}
        assert archive["/3/Conv"].shape == (8,) and archive["/3/Conv"].dtype == np.float64
    assert settings["attack"]["eps"] == pytest.approx(8 / 255)
    assert settings["samples"] == 24 and settings["batchnorm"] == "eval"
    again = compute_alphas(digits_model, data, attack, batch_size=24, seed=3)
    clean = compute_alphas(digits_model, data, None, batch_size=24)
    assert load_alphas(out).settings == settings
    np.testing.assert_allclose(again.alphas["/3/Conv"], run.alphas["/3/Conv"], rtol=0.2)
    assert not np.allclose(clean.alphas["/3/Conv"], run.alphas["/3/Conv"], rtol=1e-3)


def test_alphas_of_an_analyzed_model_are_those_of_its_selection(digits_model):
    """Calibration passes the model it analyzed: the Convs convert takes, values unchanged."""
    data = load_dataset("digits", limit=12)
    (attack,) = make_attacks("pgd-linf", {"*": 8 / 255}, steps=2)
    whole = compute_alphas(digits_model, data, attack, seed=1)
    selected = compute_alphas(analyze(load_model(digits_model)), data, attack, seed=1)
    assert set(whole.alphas) == {"/0/Conv", "/3/Conv"} and set(selected.alphas) == {"/3/Conv"}
    np.testing.assert_allclose(selected.alphas["/3/Conv"], whole.alphas["/3/Conv"], rtol=1e-6)
    assert selected.settings["model"] is None and whole.settings["model"] == str(digits_model)


def test_convert_accepts_the_alphas_file(digits_model, tmp_path):
    from gdws_deploy.pipeline.convert import convert

    run = compute_alphas(digits_model, load_dataset("digits", limit=8), None)
    path = save_alphas(run, tmp_path / "a.npz")
    _, report = convert(digits_model, budget=2, alphas=path, check_parity=False)
    assert report.converted == 1  # the first conv stays dense by default


def test_cli_writes_alphas(digits_model, tmp_path, capsys):
    out = tmp_path / "a.npz"
    args = ["alphas", digits_model, "--dataset", "digits", "--limit", "8", "-o", out]
    result = run_cli(capsys, *args, "--steps", "2", "--eps", "4/255")
    assert result.code == 0, result.err
    assert "wrote alphas of 2 Conv(s) from 8 samples" in result.out
    assert json.loads(str(np.load(out)[SETTINGS_KEY]))["attack"]["eps"] == pytest.approx(4 / 255)


def _unsupported_model(path):
    model = conv_chain([ConvSpec(4, weights="random")])
    model.graph.node.append(onnx.helper.make_node("Softsign", ["scores"], ["soft"], name="odd"))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "case, extra, fragment",
    [
        ("missing model", ["--dataset", "digits"], "does not exist"),
        ("shape mismatch", ["--dataset", "npz:{tmp}/cifar.npz"], "has images of shape (3, 32, 32)"),
        ("label out of range", ["--dataset", "npz:{tmp}/labels.npz"], "has label 12"),
        ("negative eps", ["--dataset", "digits", "--eps", "-1"], "--eps must be a finite number"),
        ("output is input", ["--dataset", "digits", "-o", "{model}"], "is the input file"),
        ("unsupported op", ["--dataset", "digits"], "unsupported op Softsign in node 'odd'"),
        ("bad mean", ["--dataset", "digits", "--mean", "0.1,0.2"], "--mean has 2 values"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(
    digits_model, tmp_path, capsys, case, extra, fragment
):
    np.savez(tmp_path / "cifar.npz", x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4, int))
    np.savez(
        tmp_path / "labels.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([1, 12, 0, 0])
    )
    model = {"missing model": tmp_path / "absent.onnx", "unsupported op": None}.get(
        case, digits_model
    )
    if case == "unsupported op":
        model = _unsupported_model(tmp_path / "softsign.onnx")
    out = tmp_path / "out.npz"
    args = [a.format(tmp=tmp_path, model=model) for a in extra]
    if "-o" not in args:
        args += ["-o", str(out)]
    before = model.read_bytes() if model.exists() else None
    result = run_cli(capsys, "alphas", model, *args, "--limit", "4", "--steps", "1")
    assert_one_line_error(result, fragment)
    assert not out.exists()
    assert (model.read_bytes() if model.exists() else None) == before
