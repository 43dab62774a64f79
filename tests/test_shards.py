"""Sharded evaluation: the same verdicts in one process and on Ray workers, checkpoints
that survive kill -9, and the errors a user can meet (--device, Ray missing, a foreign
checkpoint)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks import make_attacks
from gdws_deploy.robustness.data import load_dataset
from gdws_deploy.robustness.evaluate import Judge, Verdicts, evaluate
from gdws_deploy.robustness.shards import Sharding, evaluate_sharded
from tests.cli_run import assert_one_line_error, run_cli
from tests.digits_fixtures import export_trained_digits_cnn, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAS_RAY = importlib.util.find_spec("ray") is not None
ATTACKS = make_attacks("pgd-linf", {"*": 0.1}, steps=5)
BATCH = 16


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    return export_trained_digits_cnn(tmp_path_factory.mktemp("shards") / "digits.onnx")


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", limit=64)


def _shards(path) -> dict:
    return json.loads(path.read_text())["shards"]


def _without_time(report) -> dict:
    return {**report.to_dict(), "seconds": None}


def _sharded(model, data, sharding, seed=3, progress=None):
    return evaluate_sharded(
        model, data, ATTACKS, batch_size=BATCH, seed=seed, sharding=sharding, progress=progress
    )


@pytest.mark.skipif(not HAS_RAY, reason="Ray not installed (pip install gdws-deploy[ray])")
def test_verdicts_are_the_same_without_ray_and_on_one_or_two_workers(digits_model, data, tmp_path):
    plain = evaluate(digits_model, data, ATTACKS, batch_size=BATCH, seed=3)
    with Judge(digits_model, channels=1) as judge:
        expected = judge.verdicts(data.x, data.y, np.arange(len(data)), ATTACKS, BATCH, 3)
    files = {}
    for workers in (0, 1, 2):
        files[workers] = tmp_path / f"workers{workers}.json"
        report = _sharded(digits_model, data, Sharding(workers=workers, resume=files[workers]))
        assert _without_time(report) == _without_time(plain)
    held = _shards(files[0])
    assert len(held) == len(data) // BATCH
    assert _shards(files[1]) == held and _shards(files[2]) == held
    merged = Verdicts.concat([Verdicts.from_json(held[str(i)]) for i in range(len(held))])
    assert merged.to_json() == expected.to_json()
    assert 0 < expected.robust.sum() < expected.clean.sum()  # the attack broke some, not all


def test_resume_does_not_recompute_the_shards_a_checkpoint_holds(digits_model, data, tmp_path):
    checkpoint = tmp_path / "run.json"
    first = _sharded(digits_model, data, Sharding(resume=checkpoint))
    record = json.loads(checkpoint.read_text())
    zero = record["shards"]["0"]
    broken = zero["robust"].count("1")
    assert broken > 0
    zero["robust"] = "0" * BATCH  # a forged shard: recomputing it would undo the forgery
    checkpoint.write_text(json.dumps(record))
    seen = []
    again = _sharded(
        digits_model, data, Sharding(resume=checkpoint), progress=lambda d, t: seen.append(d)
    )
    assert seen == [len(data)]  # everything came from the file
    assert round(again.robust_acc * len(data)) == round(first.robust_acc * len(data)) - broken


def test_a_checkpoint_of_another_run_is_refused_in_one_line(digits_model, data, tmp_path):
    checkpoint = tmp_path / "run.json"
    _sharded(digits_model, data, Sharding(resume=checkpoint, shard_size=32))
    with pytest.raises(GdwsError, match="holds another run"):
        _sharded(digits_model, data, Sharding(resume=checkpoint, shard_size=32), seed=4)
    checkpoint.write_text("{not json")
    with pytest.raises(GdwsError, match="is not a checkpoint this tool wrote"):
        _sharded(digits_model, data, Sharding(resume=checkpoint, shard_size=32))


def test_workers_without_ray_name_the_extra(digits_model, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    with pytest.raises(GdwsError, match=r"need Ray: pip install gdws-deploy\[ray\]"):
        _sharded(digits_model, data, Sharding(workers=2))


def test_eval_cuda_where_torch_sees_no_gpu_is_one_line(digits_model, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = run_cli(capsys, "eval", digits_model, "--dataset", "digits", "--device", "cuda")
    assert_one_line_error(result, "--device cuda: torch")


def test_eval_bad_device_and_provider_are_one_line(digits_model, capsys):
    result = run_cli(capsys, "eval", digits_model, "--dataset", "digits", "--device", "gpu")
    assert_one_line_error(result, "--device must be auto, cpu, cuda or cuda:N")
    result = run_cli(capsys, "eval", digits_model, "--dataset", "digits", "--providers", "rocm")
    assert_one_line_error(result, "--providers: unknown provider 'rocm'")


def _eval_args(model, *extra):
    return [
        "eval",
        model,
        "--dataset",
        "digits",
        "--limit",
        "96",
        "--batch-size",
        "8",
        "--attack",
        "pgd-linf",
        "--eps",
        "0.1",
        "--steps",
        "60",
        "--device",
        "cpu",
        *extra,
    ]


def test_kill_9_mid_run_then_resume_gives_the_same_report(digits_model, tmp_path, capsys):
    checkpoint, resumed, straight = tmp_path / "ck.json", tmp_path / "a.json", tmp_path / "b.json"
    command = [sys.executable, "-m", "gdws_deploy.cli", *map(str, _eval_args(digits_model))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "--resume", str(checkpoint)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and len(_shards(checkpoint)) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    held = _shards(checkpoint)
    assert 3 <= len(held) < 12, "killed too late: make the run longer"
    result = run_cli(capsys, *_eval_args(digits_model, "--resume", checkpoint, "--json", resumed))
    assert result.code == 0, result.err
    assert all(_shards(checkpoint)[key] == value for key, value in held.items())
    assert run_cli(capsys, *_eval_args(digits_model, "--json", straight)).code == 0
    one, other = (json.loads(path.read_text()) for path in (resumed, straight))
    one["seconds"] = other["seconds"] = None
    assert one == other


def _shard_workers() -> list:
    """Pids of processes that run a shard now (Ray titles a busy worker ray::_shard)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::_shard"):
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not HAS_RAY, reason="Ray not installed (pip install gdws-deploy[ray])")
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's workers in /proc")
def test_a_worker_killed_mid_shard_costs_a_retry_not_the_run(digits_model, data, tmp_path):
    import threading

    attacks = make_attacks("pgd-linf", {"*": 0.1}, steps=40)
    plain = evaluate(digits_model, data, attacks, batch_size=BATCH, seed=3)
    outcome = {}

    def run() -> None:
        outcome["report"] = evaluate_sharded(
            digits_model, data, attacks, batch_size=BATCH, seed=3, sharding=Sharding(workers=2)
        )

    thread = threading.Thread(target=run)
    thread.start()
    # Ray's start-up alone took over a minute on a loaded 2-core machine: wait while it runs
    deadline, killed = time.monotonic() + 240, None
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        busy = _shard_workers()
        if busy:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.005)
    thread.join(240)
    assert killed is not None, "no shard was seen running"
    assert _without_time(outcome["report"]) == _without_time(plain)
