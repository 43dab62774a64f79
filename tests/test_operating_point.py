"""--max-robust-drop: the search on a small trained model, its bracket, and the CLI."""

from __future__ import annotations

import json

import pytest
from digits_fixtures import export_trained_digits_cnn, one_torch_thread  # noqa: F401
from search_fixtures import quick_check

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir import analyze as ir_analyze
from gdws_deploy.ir.analyze import analyze
from gdws_deploy.ir.graph import check_and_infer, load_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.gdws.decompose import SpectraCache
from gdws_deploy.pipeline.calibrated import DropNotKeptError, _candidates, convert_calibrated
from gdws_deploy.pipeline.operating_point import (
    MAC_TARGET,
    RESOLUTION,
    TUNE_CACHE_NAME,
    Probe,
    _bracket,
    check_max_drop,
    clean_budget,
    search_operating_point,
)
from gdws_deploy.robustness.sensitivity import calibrate
from tests.cli_run import assert_one_line_error, run_cli

MAX_DROP = 0.05
# the digits CNN's classifier weight (a --finetune stand-in changes it)
GEMM_WEIGHT = "7.weight"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    return export_trained_digits_cnn(tmp_path_factory.mktemp("model") / "digits.onnx")


def _robust_as_judged(model, original) -> float:
    """`model`'s robust accuracy under the search's verdicts: quick_check's attacks and
    the original's adversarial examples, per sample the worse."""
    return quick_check().transferred_from(original).evaluate(model).robust_acc


@pytest.mark.usefixtures("one_torch_thread")
def test_search_keeps_the_drop_and_the_next_probe_above_exceeds_it(digits_model, tmp_path):
    cache = SpectraCache()
    point = search_operating_point(
        digits_model, MAX_DROP, quick_check(), tmp_path, ConvertOptions(spectra_cache=cache)
    )
    best = point.best
    assert best is not None and best.within and best.drop <= MAX_DROP + 1e-9
    # same samples, attacks, seed and the original's examples: measuring the chosen model
    # again gives the same figure
    assert best.robust_acc == _robust_as_judged(best.model, digits_model)
    assert point.check["transfer_from"] == "digits.onnx"
    above = [p for p in point.probes if p.target > best.target]
    assert above, "the search must have seen a target beyond the drop"
    next_above = min(above, key=lambda p: p.target)
    assert not next_above.within and next_above.drop > MAX_DROP
    assert next_above.target / best.target <= 1 + RESOLUTION
    for probe in point.probes:
        assert probe.within == (probe.drop <= MAX_DROP + 1e-9)
        assert probe.drop == pytest.approx(point.robust_acc - probe.robust_acc)
        assert probe.reduction >= probe.target * (1 - 1e-9)
    assert cache.computed == 1  # one SVD for the one eligible conv, across every probe


@pytest.mark.usefixtures("one_torch_thread")
def test_search_that_nothing_passes_keeps_the_original(digits_model, tmp_path):
    point = search_operating_point(
        digits_model, 0.0, quick_check(), tmp_path, grid=(3.0,), resolution=2
    )
    assert point.best is None
    assert [(p.target, p.within) for p in point.probes] == [(3.0, False)]
    assert point.probes[0].drop > 0


@pytest.mark.usefixtures("one_torch_thread")
def test_targets_out_of_reach_bound_the_search(digits_model, tmp_path):
    point = search_operating_point(
        digits_model, 0.99, quick_check(), tmp_path, grid=(2.0, 50.0), resolution=4
    )
    assert [p.target for p in point.probes] == [2.0, 50.0, 10.0]
    assert [p.reduction is None for p in point.probes] == [False, True, True]
    assert "cannot reach 50x fewer MACs: at most 3.3" in point.probes[1].note
    assert point.best == point.probes[0]


@pytest.mark.usefixtures("one_torch_thread")
def test_convert_calibrated_writes_the_searched_target_calibrated_once(digits_model, tmp_path):
    out, probes, stages = tmp_path / "fast.onnx", [], []
    point, report, rewritten = convert_calibrated(
        digits_model, out, ConvertOptions(), quick_check(), MAX_DROP,
        on_probe=probes.append, stage=stages.append,
    )  # fmt: skip
    assert stages == ["calibrating on 100 samples of digits"]
    assert [(p.target, p.drop) for p in probes] == [(p.target, p.drop) for p in point.probes]
    assert point.best is not None and point.best.model is None  # the probe files are gone
    assert report.target == f"mac_reduction={point.best.target:g}"
    # under allocation auto both rules are searched; the answer is the fastest of either
    assert {p.rule for p in point.probes} == {"relative", "measured"}
    assert report.allocation == point.best.rule and report.reduction == point.best.reduction
    assert point.best.reduction == max(p.reduction for p in point.probes if p.within)
    assert rewritten and out.exists() and report.parity is not None
    assert _robust_as_judged(out, digits_model) == point.best.robust_acc


@pytest.mark.usefixtures("one_torch_thread")
def test_convert_calibrated_fixed_target_keeps_the_rule_judged_most_robust(digits_model, tmp_path):
    """Under auto, a calibrated MAC target is converted under every rule, and relative (the
    uncalibrated default) is written unless another is significantly more robust."""
    out = tmp_path / "fixed.onnx"
    options = ConvertOptions(mac_reduction=1.5, check_parity=False)
    choice, report, rewritten = convert_calibrated(digits_model, out, options, quick_check())
    assert [score.rule for score in choice.scores] == ["relative", "measured"]
    relative, measured = choice.scores
    assert relative.robust_z == relative.clean_z == 0.0
    if measured.robust_acc > relative.robust_acc:
        assert measured.robust_z > 0
    assert choice.chosen == ("measured" if measured.beats_default else "relative")
    assert choice.chosen == report.allocation
    assert rewritten and out.exists() and report.reduction >= 1.5 and report.parity is None
    kept = next(score for score in choice.scores if score.rule == choice.chosen)
    assert _robust_as_judged(out, digits_model) == kept.robust_acc
    assert all(score.reduction >= 1.5 for score in choice.scores)


@pytest.mark.usefixtures("one_torch_thread")
def test_convert_calibrated_with_a_named_rule_uses_it(digits_model, tmp_path):
    out = tmp_path / "fixed.onnx"
    options = ConvertOptions(mac_reduction=1.5, check_parity=False, allocation="measured")
    choice, report, rewritten = convert_calibrated(digits_model, out, options, quick_check())
    assert choice is None and rewritten and report.allocation == "measured"


@pytest.mark.usefixtures("one_torch_thread")
def test_convert_calibrated_keeping_no_drop_raises_with_the_search_and_writes_nothing(
    digits_model, tmp_path
):
    out = tmp_path / "none.onnx"
    with pytest.raises(DropNotKeptError, match="within 0: nothing written") as raised:
        convert_calibrated(digits_model, out, ConvertOptions(), quick_check(), 0.0)
    point = raised.value.point
    assert point.best is None and point.probes and not any(p.within for p in point.probes)
    assert list(tmp_path.iterdir()) == []


def test_convert_calibrated_checks_the_drop_before_calibrating(digits_model, tmp_path):
    stages = []
    with pytest.raises(GdwsError, match="max robust drop must be a fraction"):
        convert_calibrated(
            digits_model, tmp_path / "o.onnx", ConvertOptions(), quick_check(), 1.5,
            stage=stages.append,
        )  # fmt: skip
    assert stages == []


@pytest.mark.usefixtures("one_torch_thread")
def test_calibrating_calibrated_options_measures_nothing_again(digits_model):
    calibrated = calibrate(digits_model, quick_check(), ConvertOptions())
    assert calibrated.loss_curves and calibrated.spectra_cache is not None
    again = calibrate(digits_model, quick_check(), calibrated)
    assert again.loss_curves is calibrated.loss_curves
    assert again.spectra_cache is calibrated.spectra_cache


@pytest.mark.usefixtures("one_torch_thread")
def test_calibrating_an_analyzed_model_does_not_analyze_it_again(digits_model, monkeypatch):
    analyzed = analyze(load_model(digits_model))
    checked = []
    monkeypatch.setattr(ir_analyze, "check_and_infer", _counting(checked, check_and_infer))
    for allocation in ("auto", "alpha"):  # loss curves, alphas
        calibrate(analyzed, quick_check(), ConvertOptions(allocation=allocation))
    assert checked == []
    calibrate(digits_model, quick_check(), ConvertOptions(allocation="alpha"))
    assert len(checked) == 1


def _counting(calls, function):
    def counted(*args):
        calls.append(args)
        return function(*args)

    return counted


@pytest.mark.parametrize("drop", [-0.1, 1.0, float("nan")])
def test_drop_must_be_a_fraction(drop):
    with pytest.raises(GdwsError, match="max robust drop must be a fraction"):
        check_max_drop(drop)


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_writes_the_chosen_model_and_every_probe(digits_model, tmp_path, capsys):
    out, report = tmp_path / "fast.onnx", tmp_path / "report.json"
    result = run_cli(
        capsys, "convert", digits_model, "-o", out, "--report", report,
        "--max-robust-drop", MAX_DROP, "--dataset", "digits", "--limit", 100,
        "--eps", "0.05", "--steps", 2,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "chosen" in result.out and out.exists()
    record = json.loads(report.read_text())
    best = record["search"]["best"]
    assert record["target"] == f"mac_reduction={best['target']:g}"
    assert record["allocation"] == best["rule"] and best["drop"] <= MAX_DROP + 1e-9
    assert best["clean_drop"] <= 2 * MAX_DROP + 1e-9  # the default clean budget
    assert {probe["rule"] for probe in record["search"]["probes"]} == {"relative", "measured"}


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_dataset_calibrates_a_fixed_target_under_the_most_robust_rule(
    digits_model, tmp_path, capsys
):
    out, report = tmp_path / "fast.onnx", tmp_path / "report.json"
    result = run_cli(
        capsys, "convert", digits_model, "-o", out, "--report", report, "--mac-reduction", 1.5,
        "--dataset", "digits:train", "--limit", 50, "--eps", "0.05", "--steps", 1,
    )  # fmt: skip
    assert result.code == 0, result.err
    record = json.loads(report.read_text())
    assert record["allocation"] == record["rule_choice"]["chosen"] and record["reduction"] >= 1.5
    assert [score["rule"] for score in record["rule_choice"]["scores"]] == ["relative", "measured"]
    assert "search" not in record and "allocation rules at mac_reduction=1.5" in result.out


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-robust-drop", "-0.01", "--dataset", "digits"], "must be a fraction in [0, 1)"),
        (["--max-robust-drop", "0.01"], "--max-robust-drop needs --dataset CALIB"),
        (["--max-robust-drop", "0.01", "--dataset", "digits", "--beta", "1"], "leave out"),
        (["--max-robust-drop", "x"], "--max-robust-drop must be a number"),
        (["--allocation", "greedy"], "'greedy' is not one of"),
        (["--dataset", "nosuch", "--mac-reduction", "2"], "unknown dataset 'nosuch'"),
        (["--dataset", "digits", "--budget", "2"], "--beta and --budget do not use it"),
    ],
)
def test_cli_bad_calibration_input_is_one_line(digits_model, tmp_path, capsys, args, fragment):
    out = tmp_path / "out.onnx"
    result = run_cli(capsys, "convert", digits_model, "-o", out, *args)
    assert_one_line_error(result, fragment)
    assert not out.exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_a_probe_losing_clean_accuracy_beyond_its_budget_is_beyond(digits_model, tmp_path):
    point = search_operating_point(
        digits_model, 0.99, quick_check(), tmp_path, max_clean_drop=0.0, grid=(2.0, 3.0)
    )
    assert point.max_clean_drop == 0.0
    measured = [p for p in point.probes if p.drop is not None]
    assert measured
    for probe in measured:
        assert probe.drop <= 0.99  # the robust budget alone would keep every probe
        assert probe.within == (probe.clean_drop <= 1e-12)
        assert probe.clean_drop == pytest.approx(point.clean_acc - probe.clean_acc)


def test_the_clean_budget_defaults_to_twice_the_robust_one():
    assert clean_budget(0.01, None) == pytest.approx(0.02)
    assert clean_budget(0.01, 0.05) == 0.05
    with pytest.raises(GdwsError, match="max clean drop must be a fraction"):
        clean_budget(0.01, 1.5)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_tuned_search_turns_the_speed_goal_and_keeps_the_fastest_probe(digits_model, tmp_path):
    """Tuned on onnxruntime, the knob is a speed-up goal: every measured probe carries the
    speed-up measured against the original, and the answer is the fastest within budget."""
    options = ConvertOptions(tune="ort", tune_batch=32, allocation="relative")
    point = search_operating_point(
        digits_model, 0.99, quick_check(), tmp_path, options, grid=(1.2, 1.5), resolution=1
    )
    measured = [p for p in point.probes if p.drop is not None]
    assert measured and all(p.rule == "relative" for p in measured)
    # a tuned probe that rewrote anything was timed against the original
    assert all(p.speedup is not None for p in measured if p.reduction > 1)
    assert point.best is None or point.best.gain == max(p.gain for p in point.probes if p.within)
    # every family is bracketed: the tuned MAC target, the efficient one, the speed-up goal
    assert {p.knob for p in point.probes} == {
        "mac_reduction",
        "speedup",
        "mac_reduction speed_ratio=0.8",
    }
    assert (tmp_path / TUNE_CACHE_NAME).exists()  # one tune cache for every probe


def test_each_tuned_family_keeps_its_own_settings_after_calibration(digits_model):
    """Calibration is shared by families measured alike, its products only: the speed-up
    family must not inherit the other family's speed ratio (two speed goals at once)."""
    candidates = _candidates(digits_model, quick_check(), ConvertOptions(tune="ort"))
    # each speed family under the relative rule first, then the tuned MAC target under both
    assert [(options.allocation, knob.label) for options, knob in candidates] == [
        ("relative", "mac_reduction speed_ratio=0.8"),
        ("relative", "speedup"),
        ("relative", "mac_reduction"),
        ("measured", "mac_reduction"),
    ]
    for options, knob in candidates:
        aimed = knob.options(options, 2.0)
        aimed.describe_target()  # one valid target: raises on two speed goals
        assert aimed.speed_ratio == dict(knob.fixed).get("speed_ratio")
    assert len({id(options.spectra_cache) for options, _ in candidates}) == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_every_probe_is_refined_before_it_is_judged_and_the_answer_is_refined(
    digits_model, tmp_path
):
    """--finetune's hook: the search judges (and writes) the model it refined."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    refined = []

    def halve_the_head(model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        head = next(t for t in out.graph.initializer if t.name == GEMM_WEIGHT)
        head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 0.5, head.name))
        refined.append(out)
        return out

    point = search_operating_point(
        digits_model, MAX_DROP, quick_check(), tmp_path, grid=(1.5, 3.0), resolution=2,
        refine=halve_the_head,
    )  # fmt: skip
    assert len(refined) == len(point.probes) >= 2
    written = load_model(point.probes[0].model).model
    head = next(t for t in written.graph.initializer if t.name == GEMM_WEIGHT)
    original = next(
        t for t in load_model(digits_model).model.graph.initializer if t.name == GEMM_WEIGHT
    )
    np.testing.assert_allclose(
        numpy_helper.to_array(head), numpy_helper.to_array(original) * 0.5, rtol=1e-6
    )


@pytest.mark.usefixtures("one_torch_thread")
def test_a_probe_no_faster_than_one_kept_is_neither_refined_nor_judged(digits_model, tmp_path):
    """A second family's probes that cannot beat the answer cost a conversion only (a
    fine-tune each, under --finetune, otherwise); the bracket climbs past them."""
    refined = []

    def count(model):
        refined.append(model)
        return model

    options = ConvertOptions(allocation="relative")
    point = search_operating_point(
        digits_model, 0.99, quick_check(), tmp_path, [(options, MAC_TARGET)] * 2,
        grid=(1.5, 2.0), resolution=2, refine=count,
    )  # fmt: skip
    first, second = point.probes[:2], point.probes[2:]
    assert [p.target for p in first] == [1.5, 2.0] and all(p.within for p in first)
    assert [p.target for p in second] == [1.5, 2.0]  # climbed past the first, too
    for probe in second:
        assert probe.dominated and not probe.within and probe.drop is None
        assert probe.model is None and "not judged" in probe.note
        assert probe.gain <= first[1].gain
    assert len(refined) == 2 and point.best == first[1]


@pytest.mark.parametrize("answer", [1.2, 1.5, 2.7, 5.0, 7.9, 9.0])
def test_the_bracket_binary_searches_the_grid_then_bisects(answer):
    """Within iff target <= answer: the grid costs log2 probes, and the bracket closes on
    the answer to the resolution."""
    grid, probed = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0), []

    def run(target: float) -> Probe:
        probed.append(target)
        return Probe(target, within=target <= answer)

    _bracket(run, grid, RESOLUTION)
    on_grid = [t for t in probed if t in grid]
    assert len(on_grid) <= 3 and on_grid == probed[: len(on_grid)]
    within = [t for t in probed if t <= answer]
    beyond = [t for t in probed if t > answer]
    low = max(within, default=1.0)
    if answer >= grid[-1]:
        assert not beyond and low == grid[-1]
    else:
        assert low <= answer < min(beyond) <= low * (1 + RESOLUTION)


def test_a_dominated_probe_climbs_the_bracket():
    probed = []

    def run(target: float) -> Probe:
        probed.append(target)
        return Probe(target, within=False, dominated=target < 3, note="not judged")

    _bracket(run, (1.5, 2.0, 3.0, 4.0), RESOLUTION)
    assert probed[:2] == [2.0, 3.0] and all(t >= 2.0 for t in probed)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--finetune", "5"], "fine-tunes --max-robust-drop's probes"),
        (["--finetune-data", "digits:train"], "--finetune-data needs --finetune STEPS"),
        (["--max-robust-drop", "0.05", "--finetune", "5"], "--finetune needs --finetune-data"),
        (
            ["--max-robust-drop", "0.05", "--finetune", "5", "--finetune-data", "digits"],
            "judging on the data fine-tuned on",
        ),
    ],
)
def test_finetune_flags_that_do_not_go_together_are_one_line_errors(
    digits_model, tmp_path, capsys, extra, fragment
):
    output = tmp_path / "out.onnx"
    args = ["convert", digits_model, "-o", output, "--dataset", "digits", *extra]
    if "--max-robust-drop" not in extra:
        args += ["--mac-reduction", "2"]
    assert_one_line_error(run_cli(capsys, *args), fragment)
    assert not output.exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_search_with_finetune_writes_a_fine_tuned_answer_and_says_so(
    digits_model, tmp_path, capsys
):
    output = tmp_path / "out.onnx"
    result = run_cli(
        capsys, "convert", digits_model, "-o", output, "--max-robust-drop", "0.05",
        "--dataset", "digits", "--limit", "60", "--steps", "2", "--eps", "0.05",
        "--finetune", "2", "--finetune-data", "digits:train",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "every probe was fine-tuned 2 steps on digits:train" in result.out
    assert output.exists()
