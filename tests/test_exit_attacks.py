"""Attacks on the bundled multi-exit model, judged by its staged runtime (issue 16)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gdws_deploy.exits.calibrate import calibrate_model
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.exit_attacks import (
    EXIT_ATTACKS,
    ExitAttackSettings,
    ExitJudge,
    evaluate_exits,
    soft_gate,
)
from gdws_deploy.runtime.staged import entropy, exit_taken
from tests.cli_run import assert_one_line_error, run_cli

MODEL = Path(__file__).resolve().parent.parent / "models" / "multi_exit_photos.onnx"
# small limits: 4 steps of 2.5 eps / 4, 200 Square queries
QUICK = ExitAttackSettings(steps=4, queries=200)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """The bundled model with thresholds for 70 % of the single-pass MACs (train patches)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("exit_attacks") / "calibrated.onnx"
    data = load_dataset("photos:train", 600)
    calibrate_model(MODEL, out, data.x, data.y, 0.7, dataset="photos:train")
    return out


@pytest.fixture(scope="module")
def test_slice():
    # The loader deals classes out in turn: the first 40 hold 4 of each.
    return load_dataset("photos:test", 40)


@pytest.fixture(scope="module")
def report(calibrated, test_slice):
    return evaluate_exits(calibrated, test_slice, EXIT_ATTACKS, QUICK, seed=0)


def _random_exits(count: int = 400, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(count, 1, generator=generator) * 6
    return tuple(torch.randn(count, 10, generator=generator) * scales for _ in range(3))


def test_soft_gate_weights_sum_to_one_at_any_temperature():
    exits = _random_exits()
    for tau in (1e-3, 0.1, 10.0):
        gate = soft_gate(exits, (1.0, 1.5), tau)
        assert (gate >= 0).all()
        torch.testing.assert_close(gate.sum(1), torch.ones(len(gate)))


def test_soft_gate_is_the_runtime_gate_in_the_limit_tau_to_zero():
    exits = _random_exits()
    thresholds = (1.0, 1.5)
    logits = [z.numpy() for z in exits]
    taken = exit_taken(logits, thresholds)
    # away from ties: no gated entropy within 1e-3 nats of its threshold
    gaps = np.stack([np.abs(entropy(z) - t) for z, t in zip(logits, thresholds)], 1)
    clear = gaps.min(1) > 1e-3
    assert clear.mean() > 0.95 and len(np.unique(taken[clear])) == 3
    gate = soft_gate(exits, thresholds, 1e-5).numpy()
    np.testing.assert_array_equal(gate[clear].argmax(1), taken[clear])
    np.testing.assert_allclose(gate[clear].max(1), 1.0, atol=1e-6)


def test_verdicts_equal_the_whole_model_gated_by_exit_taken(calibrated, test_slice):
    """The staged runtime (samples drop out of the batch) answers as onnxruntime's whole
    model gated by exit_taken, on clean and adversarial inputs alike."""
    with ExitJudge(calibrated) as judge:
        x, y = torch.from_numpy(test_slice.x), torch.from_numpy(test_slice.y)
        adversarial = judge.attack("exit-aware", x, y, torch.arange(len(x)), QUICK, 0)
        session = ort.InferenceSession(str(calibrated), providers=["CPUExecutionProvider"])
        for batch in (test_slice.x, adversarial.numpy()):
            every = session.run(None, {session.get_inputs()[0].name: batch})
            taken = exit_taken(every, judge.thresholds)
            logits, exits = judge.staged.predict(batch)
            np.testing.assert_array_equal(exits, taken)
            np.testing.assert_allclose(
                logits, np.stack(every)[taken, np.arange(len(batch))], atol=1e-5
            )
            # the mirror's gate, which picks each attack's best iterate, agrees
            with torch.no_grad():
                _, mirrored = judge.gated(judge.mirror(torch.from_numpy(batch)))
            np.testing.assert_array_equal(mirrored, taken)


def test_every_attack_lowers_the_staged_runtimes_accuracy(report):
    assert [outcome.name for outcome in report.attacks] == list(EXIT_ATTACKS)
    for outcome in report.attacks:
        assert outcome.accuracy < report.clean.accuracy, outcome
    assert report.worst.accuracy <= min(outcome.accuracy for outcome in report.attacks)


def test_exits_and_compute_are_counted_over_every_sample(report):
    cost = np.asarray(report.stage_macs) / report.full_macs
    for outcome in (report.clean, *report.attacks):
        assert sum(outcome.exit_shares) == pytest.approx(1.0)
        assert outcome.expected_share == pytest.approx(np.dot(outcome.exit_shares, cost))
    # the worst case charges each sample the most any attack forced on it
    assert report.worst.expected_share >= max(o.expected_share for o in report.attacks) - 1e-12
    assert report.worst.expected_share <= cost[-1]
    low, high = report.worst.ci95
    assert low <= report.worst.accuracy <= high


def test_the_mirror_agrees_with_the_runtime_on_adversarial_inputs(report):
    assert report.worst.disagreements == 0


def test_same_seed_gives_the_same_report(calibrated, test_slice, report):
    again = evaluate_exits(calibrated, test_slice, EXIT_ATTACKS, QUICK, seed=0, batch_size=40)
    first, second = report.to_dict(), again.to_dict()
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_thresholds_given_override_the_metadata(calibrated, test_slice):
    # closed early exits (entropy is never below -1): everything runs to the final exit
    few = test_slice.limit(10)
    report = evaluate_exits(
        calibrated, few, ["pgd-final"], replace(QUICK, steps=1), thresholds=(-1.0, -1.0)
    )
    assert report.thresholds == (-1.0, -1.0)
    assert report.clean.exit_shares == (0.0, 0.0, 1.0)
    assert report.clean.expected_share == pytest.approx(report.stage_macs[-1] / report.full_macs)


def test_cli_writes_the_report(calibrated, capsys, tmp_path):
    out = tmp_path / "report.json"
    result = run_cli(
        capsys,
        "exits",
        "eval",
        calibrated,
        "--dataset",
        "photos",
        "--limit",
        "5",
        "--attack",
        "pgd-final,square",
        "--steps",
        "1",
        "--queries",
        "5",
        "--json",
        out,
    )
    assert result.code == 0, result
    assert "worst case" in result.out and "square" in result.out
    assert out.is_file() and '"worst"' in out.read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--attack", "pgd-nowhere"], "unknown exit attack pgd-nowhere"),
        (["--tau", "0"], "tau must be > 0"),
        (["--eps", "x/3"], "is not a number"),
        (["--thresholds", "0.5"], "3 exits need 2 thresholds"),
    ],
)
def test_bad_settings_are_one_line_errors(calibrated, capsys, args, fragment):
    result = run_cli(capsys, "exits", "eval", calibrated, "--dataset", "photos", *args)
    assert_one_line_error(result, fragment)


def test_a_single_exit_model_is_a_one_line_error(capsys):
    bundled = MODEL.with_name("robust_photos.onnx")
    result = run_cli(capsys, "exits", "eval", bundled, "--dataset", "photos", "--limit", "2")
    assert_one_line_error(result, "a multi-exit model has outputs exit_0")


def test_a_stage_folder_is_a_one_line_error(capsys, tmp_path):
    result = run_cli(capsys, "exits", "eval", tmp_path, "--dataset", "photos", "--limit", "2")
    assert_one_line_error(result, "the attacks need the whole multi-exit ONNX model")


def test_uncalibrated_model_is_a_one_line_error(capsys):
    result = run_cli(capsys, "exits", "eval", MODEL, "--dataset", "photos", "--limit", "2")
    assert_one_line_error(result, "no exit thresholds")
