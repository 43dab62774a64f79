"""`--speedup`: uniform factors, the sum form, layer times measured inside the whole model
(onnxruntime's real profiler) and the conversion that uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from gdws_deploy import convert
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.passes.gdws.allocation import resolve_allocation
from gdws_deploy.passes.gdws.compression import GdwsPass
from gdws_deploy.passes.gdws.decompose import UNIFORM_PER_CHANNEL, ChannelSpectra, uniform
from gdws_deploy.robustness.attacks import make_attacks
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.sensitivity import measure_loss_curves
from gdws_deploy.speed.backends import OrtBackend
from gdws_deploy.speed.context_timing import (
    FIXED,
    ContextTimer,
    OptionForm,
    charge,
    owners,
    saves_macs,
)
from gdws_deploy.speed.goals import ACCEPT, AIM, REFINEMENTS, SpeedGoal, refine
from gdws_deploy.speed.time_allocation import SlowerThanBudgetError
from tests.cli_run import assert_one_line_error, run_cli
from tests.conv_models import run
from tests.test_lowering import chain_model, factored, gap, images, lowered, ops, tuning_model

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "robust_photos.onnx"


@pytest.mark.parametrize("per_channel", [1, 2, 5, 9, 12])
def test_uniform_keeps_the_strongest_kernels_of_every_channel(per_channel):
    weight = np.random.default_rng(0).standard_normal((6, 4, 3, 3))
    alpha = np.array([1.0, 2.0, 0.5, 3.0])
    spectra = ChannelSpectra.from_weight(weight)
    factors = uniform(spectra, per_channel, alpha)
    kept = min(per_channel, 6)
    assert (factors.kernels_per_channel() == kept).all()
    residual = (weight - factors.to_dense()).transpose(1, 0, 2, 3).reshape(4, -1)
    assert factors.error == pytest.approx(alpha @ (residual**2).sum(1), rel=1e-9, abs=1e-9)
    assert factors.error == pytest.approx(spectra.dropped_energy(kept, alpha), abs=1e-12)
    with pytest.raises(GdwsError, match="whole number >= 1"):
        uniform(spectra, 0)


def test_sum_adds_one_pointwise_conv_per_slice_and_folds_the_batchnorm_into_each():
    model = chain_model("random", seed=2)
    chosen, types = factored(model, lambda w: uniform(w, 3))
    summed = lowered(model, chosen, types, "sum")
    assert "Concat" not in ops(summed) and "Gather" not in ops(summed)
    # c0 -> BN and c2 -> BN fold into their pointwise convs; the BN after the MaxPool stays
    assert ops(model).count("BatchNormalization") == 3
    assert ops(summed).count("BatchNormalization") == 1
    for layer, _ in chosen:
        names = [n.name for n in summed.graph.node if n.name.startswith(f"{layer.name}/gdws_pw")]
        assert sorted(names) == [f"{layer.name}/gdws_pw{j}" for j in range(3)]
    assert (
        gap(run(lowered(model, chosen, types, "gather"), images()), run(summed, images())) <= 1e-5
    )


def _timer(model, batch=4):
    analyzed = GdwsPass().select(analyze(model, all_layers=True))
    layers = analyzed.eligible
    spectra = {layer.name: ChannelSpectra.from_weight(layer.weight) for layer in layers}
    return ContextTimer(OrtBackend(1), batch, analyzed, layers, spectra), layers


def test_every_profiled_gdws_node_is_charged_to_its_layer():
    model = tuning_model()
    timer, layers = _timer(model)
    lowered_model = timer.lowered(OptionForm("sum", 2))
    owner = owners(lowered_model, [layer.name for layer in layers])
    for node in lowered_model.graph.node:
        if "/gdws_" in node.name:
            assert owner[node.name] == node.name.split("/gdws_")[0]
    assert owner["big/gdws_pw1"] == "big" and "pooled" in owner  # MaxPool follows big
    profiled = {"big/gdws_dw0": 1.0, "big/gdws_pw1_nchwc": 2.0, "ReorderInput": 4.0}
    assert charge(profiled, owner) == {"big": 3.0, FIXED: 4.0}
    # TensorRT's names of fused layers: the time is shared among the ONNX nodes in it
    fused = {"big/gdws_dw0 + big/gdws_pw0": 2.0, "PWN(big/gdws_pw1, unknown)": 1.0}
    assert charge(fused, owner) == {"big": 2.5, FIXED: 0.5}


def test_in_context_times_come_from_the_whole_model_and_are_cached():
    timer, layers = _timer(tuning_model())
    dense = timer.seconds(OptionForm("dense"))
    assert set(dense) == {layer.name for layer in layers} | {FIXED}
    assert all(seconds > 0 for seconds in dense.values())
    one = timer.seconds(OptionForm("sum", 1))
    assert one["big"] < dense["big"]  # a 64-channel 32x32 conv at 1 kernel per channel
    before = dict(timer.cache.seconds)
    assert timer.seconds(OptionForm("sum", 1)) == one and timer.cache.seconds == before


def test_forms_measured_together_are_profiled_in_one_pass_and_cached():
    timer, layers = _timer(tuning_model())
    forms = [OptionForm("dense"), OptionForm("sum", 1), OptionForm("pad", 2)]
    timer.measure(forms)
    before = dict(timer.cache.seconds)
    times = [timer.seconds(form) for form in forms]
    assert timer.cache.seconds == before  # nothing profiled again
    assert times[1]["big"] < times[0]["big"]
    assert {name for name in times[2] if name != FIXED} == {
        layer.name for layer in layers if saves_macs(layer, 2)
    }


def test_onnxruntime_profiles_each_model_of_a_set_by_its_own_nodes():
    timer, _ = _timer(tuning_model())
    first, second = timer.model, timer.lowered(OptionForm("sum", 1))
    shape = (2, 8, 32, 32)
    profiles = OrtBackend(1).node_seconds(
        [first.SerializeToString(), second.SerializeToString()], shape, 3
    )
    assert len(profiles) == 2 and any("/gdws_" in name for name in profiles[1])
    assert not any("/gdws_" in name for name in profiles[0])
    for model, profile in zip((first, second), profiles):
        nodes = {node.name for node in model.graph.node} | {
            output for node in model.graph.node for output in node.output
        }
        assert any(name.removesuffix("_nchwc") in nodes for name in profile)
        assert all(seconds >= 0 for seconds in profile.values())


def test_convert_for_a_speedup_gives_every_layer_dense_or_uniform_kernels(tmp_path):
    model = tuning_model()
    converted, report = converted_for(model, tmp_path, speedup=1.5)
    assert report.target == "mac_reduction=1.5 speedup=1.5"
    assert report.reduction >= 1.5 and report.measured_speedup is not None
    for row in report.layers:
        if row.kernels is None:
            assert row.lowering == "dense" and row.macs_after == row.macs_before
        else:
            assert row.lowering in ("sum", "pad") and row.kernels % row.weight_shape[1] == 0
    assert report.converted >= 1 and report.parity is not None
    assert {n.name for n in converted.graph.node} >= {r.name for r in report.layers if r.skipped}


def converted_for(model, tmp_path, **goal):
    """`model` converted at 1.5x fewer MACs with a speed goal, tuned at batch 4."""
    return convert(
        model,
        mac_reduction=1.5,
        all_layers=True,
        tune=OrtBackend(1),
        tune_batch=4,
        tune_cache=tmp_path / "tune.json",
        **goal,
    )


def test_convert_for_a_speed_ratio_reports_what_it_measured(tmp_path):
    _, report = converted_for(tuning_model(), tmp_path, speed_ratio=0.5)
    assert report.target == "mac_reduction=1.5 speed_ratio=0.5"
    assert report.reduction >= 1.5 and report.measured_speedup > 0


def test_a_speed_goal_needs_tuning_and_a_ratio_needs_a_mac_target():
    with pytest.raises(GdwsError, match="a speed goal is measured: give a backend to tune on"):
        convert(tuning_model(), speedup=2.0)
    with pytest.raises(GdwsError, match="share of the MAC reduction: give one too"):
        convert(tuning_model(), speed_ratio=0.8, tune=OrtBackend(1))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tuning.onnx"
    onnx.save(tuning_model(), str(path))
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--speedup", "2"], "are measured: give --tune ort|trt too"),
        (["--speedup", "0.5", "--tune", "ort"], "speed-up must be a finite number >= 1"),
        (["--speedup", "2", "--beta", "0", "--tune", "ort"], "alone or with a MAC reduction"),
        (["--speedup", "fast", "--tune", "ort"], "--speedup must be a number"),
        (
            ["--speedup", "2", "--max-robust-drop", "0.01", "--dataset", "digits"],
            "searches the speed goal itself",
        ),
        (["--speed-ratio", "0", "--mac-reduction", "2", "--tune", "ort"], "must be a finite"),
        (
            ["--speedup", "2", "--speed-ratio", "0.8", "--mac-reduction", "2", "--tune", "ort"],
            "give one speed goal",
        ),
    ],
)
def test_bad_speedup_flags_are_one_line_errors(capsys, model_file, flags, message):
    result = run_cli(capsys, "convert", model_file, *flags)
    assert_one_line_error(result, message)
    assert not model_file.with_name("tuning.gdws.onnx").exists()


def test_measured_curves_of_a_speed_goal_cut_every_channel_alike():
    attacks = tuple(make_attacks("pgd-linf", {"linf": 4 / 255}, steps=2))
    check = RobustnessCheck(load_dataset("photos", limit=64), attacks)
    curves = measure_loss_curves(BUNDLED, check, per_channel=True)
    layers = GdwsPass().select(analyze(onnx.load(str(BUNDLED)))).eligible
    for layer in layers:
        channels = layer.weight_shape[1]
        offered = [m * channels for m in UNIFORM_PER_CHANNEL if saves_macs(layer, m)]
        curve = curves[layer.name]
        assert list(curve.counts) == [0, *offered]
        assert curve.losses[0] > curve.losses[-1]  # the layer zeroed costs most
    assert resolve_allocation("auto", has_curves=True, speed_goal=True) == "relative"


class Attempts:
    """A planner that measures each aim's plan at the next of `cleared` (None: the aim is
    out of reach) and records the aims it was asked for."""

    def __init__(self, *cleared):
        self.cleared, self.aims = list(cleared), []

    def __call__(self, aim):
        self.aims.append(aim)
        cleared = self.cleared.pop(0)
        if cleared is None:
            raise SlowerThanBudgetError([])
        return cleared, f"plan {len(self.aims)}"


def test_refine_stops_at_the_first_plan_that_clears_its_goal_with_room():
    attempts = Attempts(ACCEPT + 0.01)
    assert refine(attempts) == "plan 1" and attempts.aims == [AIM]


def test_refine_raises_the_aim_by_the_shortfall_and_keeps_the_best_measured_plan():
    attempts = Attempts(0.9, 1.02, 0.97, 1.0)
    assert refine(attempts) == "plan 2"
    assert len(attempts.aims) == REFINEMENTS + 1
    assert attempts.aims[1] == pytest.approx(AIM * AIM / 0.9)
    assert attempts.aims[2] == pytest.approx(attempts.aims[1] * AIM / 1.02)


def test_refine_asks_for_the_goal_itself_when_the_aim_is_out_of_reach():
    attempts = Attempts(None, 1.01, None)
    assert refine(attempts) == "plan 2" and attempts.aims[:2] == [AIM, 1.0]
    with pytest.raises(SlowerThanBudgetError):
        refine(Attempts(None, None))


def test_a_plan_slower_than_the_original_never_clears_a_speed_ratio():
    assert SpeedGoal(ratio=0.5).wanted(1.5) == 1.0 and SpeedGoal(ratio=0.8).wanted(4) == 3.2
    assert SpeedGoal(speedup=2.0).wanted(4) == 2.0


def test_the_cli_warns_exactly_when_the_model_measured_short_of_its_speed_goal(
    capsys, tmp_path, model_file
):
    output, report_path = tmp_path / "fast.onnx", tmp_path / "report.json"
    result = run_cli(
        capsys,
        "convert",
        model_file,
        "--mac-reduction", "1.5", "--speed-ratio", "0.5", "--all-layers",
        "--tune", "ort", "--tune-batch", "4", "--tune-threads", "1",
        "--tune-cache", tmp_path / "tune.json",
        "-o", output, "--report", report_path,
    )  # fmt: skip
    assert result.code == 0 and output.exists(), result
    report = json.loads(report_path.read_text())
    wanted = SpeedGoal(ratio=0.5).wanted(report["reduction"])
    assert ("short of the" in result.err) == (report["measured_speedup"] < wanted)
