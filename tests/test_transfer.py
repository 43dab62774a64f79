"""Verdicts that also count the original's adversarial examples (robustness.transfer)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnxruntime as ort
import pytest
from digits_fixtures import export_trained_digits_cnn, one_torch_thread  # noqa: F401

from gdws_deploy.errors import GdwsError
from gdws_deploy.options import ConvertOptions
from gdws_deploy.pipeline.convert import convert_file
from gdws_deploy.robustness.attacks import make_attacks
from gdws_deploy.robustness.check import RobustnessCheck, with_transfer
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.evaluate import Judge, evaluate
from gdws_deploy.robustness.shards import Sharding, evaluate_sharded
from gdws_deploy.robustness.transfer import Transfer, transfer_from
from tests.cli_run import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAS_RAY = importlib.util.find_spec("ray") is not None
ATTACKS = tuple(make_attacks("pgd-linf", {"*": 0.1}, steps=5))
WEAK = tuple(make_attacks("pgd-linf", {"*": 0.02}, steps=1))
BATCH = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The trained digits CNN and a hard GDWS cut of it."""
    folder = tmp_path_factory.mktemp("transfer")
    original = export_trained_digits_cnn(folder / "digits.onnx")
    cut = folder / "cut.onnx"
    convert_file(original, cut, ConvertOptions(mac_reduction=3.0, check_parity=False))
    return original, cut


@pytest.fixture(scope="module")
def check():
    return RobustnessCheck(load_dataset("digits", limit=120), ATTACKS, batch_size=BATCH, seed=2)


def _backend_right(model, x, y) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == y


def test_a_sample_counts_robust_only_when_the_model_survives_both(models, check):
    """Examples crafted by a strong attack on the original, a weak white-box one on the
    cut: the transfer breaks samples the white-box attack misses."""
    original, cut = models
    data = check.dataset
    transfer = transfer_from(original, data, ATTACKS, batch_size=BATCH, seed=check.seed)
    ids = np.arange(len(data))
    with Judge(cut, channels=1) as judge:
        alone = judge.verdicts(data.x, data.y, ids, WEAK, BATCH, check.seed)
        both = judge.verdicts(data.x, data.y, ids, WEAK, BATCH, check.seed, transferred=transfer.x)
    on_transfer = _backend_right(cut, transfer.x, data.y)
    np.testing.assert_array_equal(both.transferred, on_transfer)
    np.testing.assert_array_equal(both.robust, alone.robust & on_transfer)
    np.testing.assert_array_equal(both.clean, alone.clean)
    assert both.robust.sum() < alone.robust.sum()
    report = evaluate(cut, data, WEAK, batch_size=BATCH, seed=check.seed, transfer=transfer)
    assert report.robust_acc == both.robust.mean()
    assert report.transfer_acc == on_transfer.mean()
    assert report.transfer_from == "digits.onnx"
    assert report.per_attack[-1] == {
        "name": "transfer from digits.onnx",
        "robust_acc": report.robust_acc,
        "robust_ci95": list(report.robust_ci95),
    }
    assert report.per_attack[0]["robust_acc"] == alone.robust.mean()


def test_a_check_transferred_from_the_original_crafts_its_attacks_there(models, check):
    original, cut = models
    transferred = check.transferred_from(original)
    expected = transfer_from(original, check.dataset, ATTACKS, batch_size=BATCH, seed=check.seed)
    np.testing.assert_array_equal(transferred.transfer.x, expected.x)
    assert transferred.describe()["transfer_from"] == "digits.onnx"
    assert transferred.evaluate(cut).transfer_from == "digits.onnx"


def test_examples_transferred_from_the_model_itself_are_its_white_box_ones(models, check):
    original, _ = models
    plain = check.evaluate(original)
    judged = check.transferred_from(original).evaluate(original)
    assert judged.robust_acc == plain.robust_acc  # same per-sample seeds, same examples
    assert judged.transfer_acc == plain.robust_acc
    assert plain.transfer_from is None and plain.transfer_acc is None


def test_with_transfer_keeps_a_transfer_the_check_already_carries(models, check):
    original, cut = models
    carried = check.transferred_from(cut)
    assert with_transfer(carried, original) is carried
    assert with_transfer(check, original).transfer.source == "digits.onnx"


def test_examples_not_one_per_sample_are_refused(models, check):
    original, _ = models
    short = Transfer("other.onnx", check.dataset.x[:-1])
    with pytest.raises(GdwsError, match=r"transferred from other\.onnx"):
        evaluate(original, check.dataset, ATTACKS, transfer=short)


def test_sharded_verdicts_with_a_transfer_match_and_resume_only_the_same_transfer(
    models, check, tmp_path
):
    original, cut = models
    transferred = check.transferred_from(original)
    settings = dict(batch_size=BATCH, seed=check.seed)
    here = evaluate(cut, check.dataset, ATTACKS, transfer=transferred.transfer, **settings)
    for workers in (0, 1) if HAS_RAY else (0,):  # in this process, then on a Ray worker
        checkpoint = tmp_path / f"run{workers}.json"
        sharded = evaluate_sharded(
            cut,
            check.dataset,
            ATTACKS,
            transfer=transferred.transfer,
            sharding=Sharding(workers=workers, resume=checkpoint),
            **settings,
        )
        assert {**sharded.to_dict(), "seconds": 0} == {**here.to_dict(), "seconds": 0}
    assert json.loads(checkpoint.read_text())["run"]["transfer_sha256"]
    with pytest.raises(GdwsError, match="holds another run"):
        evaluate_sharded(
            cut, check.dataset, ATTACKS, sharding=Sharding(resume=checkpoint), **settings
        )


def test_eval_cli_judges_on_the_originals_examples_too(models, tmp_path, capsys):
    original, cut = models
    out = tmp_path / "report.json"
    args = ["eval", str(cut), "--dataset", "digits", "--limit", "80", "--eps", "0.1"]
    result = run_cli(capsys, *args, "--transfer-from", str(original), "--json", str(out))
    assert result.code == 0, result.err
    assert "crafted on digits.onnx" in result.out and "robust after both" in result.out
    record = json.loads(out.read_text())
    assert record["transfer_from"] == "digits.onnx"
    assert record["robust"] <= min(record["transfer_acc"], record["per_attack"][0]["robust_acc"])
    missing = run_cli(capsys, *args, "--transfer-from", str(tmp_path / "absent.onnx"))
    assert_one_line_error(missing, "absent.onnx")
