"""The Jetson kit's helpers: power readings, images/s per watt, the comparison table."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_run import run_cli
from tests.runtime_models import small_cnn

JETSON = Path(__file__).resolve().parent.parent / "jetson"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"jetson_{name}", JETSON / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


power, table = load("power"), load("table")


def test_total_power_reads_jetson_stats_4_and_3_layouts():
    v4 = {
        "rail": {"GPU": {"volt": 1000, "curr": 2000, "power": 2000, "online": True}},
        "tot": {"volt": 19000, "curr": 600, "power": 11400, "avg": 11000, "online": True},
    }
    v3 = ({"cur": 9800, "avg": 9500}, {"GPU": {"cur": 3000, "avg": 2900}})
    assert power.total_power_mw(v4) == 11400.0
    assert power.total_power_mw(v3) == 9800.0
    assert power.total_power_mw({"rail": {}}) is None


def test_power_summary_and_empty_runs():
    summary = power.power_summary([10000, 12000, 11000], seconds=1.5)
    assert summary["mean_power_w"] == pytest.approx(11.0)
    assert (summary["max_power_w"], summary["min_power_w"], summary["samples"]) == (12.0, 10.0, 3)
    with pytest.raises(ValueError, match="no power samples"):
        power.power_summary([], 1.0)


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory):
    """Real `gdws-deploy bench` reports (onnxruntime on this CPU) named as bench.sh names them."""
    folder = tmp_path_factory.mktemp("jetson")
    light = small_cnn(folder / "light.onnx", channels=4)
    heavy = small_cnn(folder / "heavy.onnx", channels=32, layers=2)
    quick = ("--warmUp", "0", "--duration", "0", "--iterations", "10", "--batch", "2")
    return folder, light, heavy, quick


def test_images_per_watt_and_table_from_real_bench_reports(bench_folder, capsys):
    folder, light, heavy, quick = bench_folder
    for role, model in (("original", heavy), ("converted", light)):
        out = folder / f"{role}.fp16.bench.json"
        assert run_cli(capsys, "bench", model, *quick, "--json", out).code == 0
        bench = json.loads(out.read_text())
        watts = {"original": 20.0, "converted": 16.0}[role]
        report = power.images_per_watt(bench, watts)
        assert report["images_per_s"] == bench["throughput_images_per_s"]
        assert report["images_per_s_per_w"] == pytest.approx(report["images_per_s"] / watts)
        (folder / f"{role}.fp16.power.json").write_text(json.dumps(report))
    compare = folder / "fp16.compare.json"
    done = run_cli(capsys, "bench", heavy, "--compare", light, *quick, "--json", compare)
    assert done.code == 0
    lines = table.table(folder)
    assert lines[0].startswith("| precision | original img/s | converted img/s | speed-up")
    assert len(lines) == 3 and lines[2].startswith("| fp16 | ")
    ratio = json.loads(compare.read_text())["throughput_ratio"]
    assert f"| {ratio:.2f}x |" in lines[2]
    assert table.main([str(folder)]) == 0
    assert (folder / "summary.md").read_text().splitlines() == lines


def test_power_script_without_jetson_stats_says_what_to_install(tmp_path):
    if importlib.util.find_spec("jtop") is not None:
        pytest.skip("jetson-stats is installed here")
    script = [sys.executable, str(JETSON / "power.py"), "--bench-json", "b.json", "--out", "p"]
    done = subprocess.run(
        [*script, "--", sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "power.py: jetson-stats is missing: sudo pip3 install jetson-stats"
    )


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_jetson_shell_scripts_are_shellcheck_clean():
    done = subprocess.run(
        ["shellcheck", *map(str, sorted(JETSON.glob("*.sh")))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout
