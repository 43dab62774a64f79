"""`gdws-deploy convert` as a user meets it: tables, files written, one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from digits_fixtures import export_trained_digits_cnn, one_torch_thread  # noqa: F401
from rich.console import Console

from gdws_deploy.cli import main
from gdws_deploy.commands.render.convert import warnings
from gdws_deploy.commands.render.progress import LayerProgress
from gdws_deploy.options import ConvertOptions
from gdws_deploy.pipeline.convert import convert
from tests.conv_models import ConvSpec, conv_chain


def gdws_deploy(capsys, *args) -> tuple:
    """(exit code, stdout, stderr) of the real entry point, in this process."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tuned_warnings(err: str) -> list:
    """stderr's lines but the untuned warning every conversion without --tune prints."""
    return [line for line in err.strip().splitlines() if not line.startswith("warning: untuned")]


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "net.onnx"
    onnx.save(conv_chain([ConvSpec(8, name="stem"), ConvSpec(8, name="body")]), str(path))
    return path


@pytest.fixture
def unwritable_dir(tmp_path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; /proc takes no new files
        return Path("/proc")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return locked


def test_convert_writes_stem_gdws_onnx_and_prints_the_layer_table(capsys, model_file):
    before = model_file.read_bytes()
    code, out, err = gdws_deploy(capsys, "convert", model_file, "--beta", "0")
    output = model_file.with_name("net.gdws.onnx")
    assert code == 0, err
    assert output.exists() and model_file.read_bytes() == before
    onnx.checker.check_model(onnx.load(str(output)), full_check=True)
    assert "body" in out and "first conv" in out and "beta=0" in out
    assert "1 Conv(s) rewritten" in out and "parity" in out
    assert f"wrote {output}" in out


def test_report_json_holds_the_same_rows_and_totals(capsys, model_file, tmp_path):
    report_path = tmp_path / "report.json"
    args = ["convert", model_file, "-o", tmp_path / "out.onnx", "--budget", "4"]
    code, out, _ = gdws_deploy(capsys, *args, "--report", report_path)
    assert code == 0
    report = json.loads(report_path.read_text())
    assert [row["name"] for row in report["layers"]] == ["stem", "body"]
    assert report["layers"][1]["kernels"] == 4 and report["converted"] == 1
    assert report["macs_after"] < report["macs_before"]
    assert report["reduction"] == pytest.approx(report["macs_before"] / report["macs_after"])
    assert report["parity"] > 0 and f"{report['parity']:.3g}" in out
    assert report["output"] == str(tmp_path / "out.onnx") and report["target"] == "budget=4"


def test_no_target_means_the_default_mac_reduction(capsys, tmp_path):
    source = tmp_path / "wide.onnx"
    specs = [ConvSpec(16, weights="random", pads=(1, 1, 1, 1)) for _ in range(4)]
    onnx.save(conv_chain(specs, (8, 8, 8)), str(source))
    code, out, _ = gdws_deploy(capsys, "convert", source, "--no-parity")
    assert code == 0
    assert (
        "mac_reduction=2" in out
        and "parity (max relative output deviation vs MODEL in onnxruntime) not checked" in out
    )
    code, out, _ = gdws_deploy(capsys, "convert", "--help")
    assert code == 0 and "--mac-reduction" in out and "default: 2" in out


def test_include_exclude_and_all_layers_reach_the_api(capsys, tmp_path):
    source = tmp_path / "four.onnx"
    names = ("stem", "a1", "a2", "b1")
    onnx.save(conv_chain([ConvSpec(8, name=n) for n in names]), str(source))
    report_path = tmp_path / "r.json"
    args = ["--all-layers", "--include", "a*", "--include", "stem", "--exclude", "a2"]
    code, _, _ = gdws_deploy(
        capsys, "convert", source, "--beta", "0", *args, "--report", report_path
    )
    assert code == 0
    rows = {row["name"]: row for row in json.loads(report_path.read_text())["layers"]}
    assert [n for n, row in rows.items() if row["kernels"]] == ["stem", "a1"]
    assert rows["a2"]["skipped"] == "excluded by --exclude"


def test_progress_bar_shows_on_terminals_for_many_layers_only():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)
    with LayerProgress(console) as progress:
        for done in range(1, 8):
            progress(done, 7, f"few{done}")
    assert screen.getvalue() == ""
    with LayerProgress(console) as progress:
        for done in range(1, 11):
            progress(done, 10, f"layer{done}")
    assert "factoring" in screen.getvalue() and "10/10" in screen.getvalue()
    pipe = io.StringIO()
    with LayerProgress(Console(file=pipe, force_terminal=False)) as progress:
        progress.stage("loading net.onnx")
        progress(10, 10, "layer10")
    assert pipe.getvalue() == ""


def test_stages_show_on_terminals_whatever_the_layer_count():
    screen = io.StringIO()
    with LayerProgress(Console(file=screen, force_terminal=True, width=100)) as progress:
        progress.stage("loading big.onnx")
        progress(1, 2, "few")
        progress.stage("checking parity in onnxruntime")
    assert "loading big.onnx" in screen.getvalue() and "few" not in screen.getvalue()
    assert "checking parity in onnxruntime" in screen.getvalue()


def test_many_layers_convert_quietly_when_not_on_a_terminal(capsys, tmp_path):
    source = tmp_path / "deep.onnx"
    specs = [ConvSpec(6, pads=(1, 1, 1, 1)) for _ in range(10)]
    onnx.save(conv_chain(specs, (6, 6, 6)), str(source))
    code, out, err = gdws_deploy(capsys, "convert", source, "--beta", "0", "--no-parity")
    assert code == 0 and tuned_warnings(err) == []
    assert "9 Conv(s) rewritten" in out
    assert source.with_name("deep.gdws.onnx").exists()


# Models no target can rewrite, and the one line that says why.
NOTHING_ELIGIBLE = [
    (  # MobileNetV2-like: depthwise 3x3 and pointwise 1x1 only
        [ConvSpec(8, group=4, pads=(1, 1, 1, 1)), ConvSpec(8, kernel=(1, 1))] * 2,
        [],
        "all Convs are depthwise, grouped or 1x1: nothing for GDWS to do",
    ),
    (
        [ConvSpec(8, name="stem"), ConvSpec(8, name="body")],
        ["--include", "head*"],
        "--include matched no Conv (names are: stem, body)",
    ),
    (
        [ConvSpec(8, source="input"), ConvSpec(8, source="input")],
        [],
        "no Conv has constant weights (2 x weight is a graph input)",
    ),
]


@pytest.mark.parametrize("specs, flags, message", NOTHING_ELIGIBLE)
def test_no_eligible_conv_fails_in_one_line_and_writes_nothing(
    capsys, tmp_path, specs, flags, message
):
    source = tmp_path / "net.onnx"
    onnx.save(conv_chain(specs), str(source))
    before = files(tmp_path)
    for target in (["--beta", "0"], ["--mac-reduction", "2"]):
        code, _, err = gdws_deploy(
            capsys, "convert", source, *target, *flags, "--report", tmp_path / "r.json"
        )
        assert_one_line_error(code, err, message)
        assert files(tmp_path) == before


def test_eligible_convs_none_worth_rewriting_fail_in_one_line(capsys, tmp_path):
    source = tmp_path / "dense.onnx"
    onnx.save(
        conv_chain([ConvSpec(8, weights="random"), ConvSpec(8, weights="random")]), str(source)
    )
    before = files(tmp_path)
    code, _, err = gdws_deploy(capsys, "convert", source, "--beta", "0")
    assert_one_line_error(code, err, "no Conv was rewritten at beta=0")
    assert "kernels beta=0 keeps cost no fewer MACs" in err and "nothing written" in err
    assert files(tmp_path) == before


def test_target_already_met_writes_the_model_unchanged(capsys, model_file):
    output = model_file.with_name("net.gdws.onnx")
    code, out, err = gdws_deploy(capsys, "convert", model_file, "--mac-reduction", "1")
    assert code == 0, err
    written, original = onnx.load(str(output)), onnx.load(str(model_file))
    assert written.SerializeToString() == original.SerializeToString()
    assert f"target already met (mac_reduction=1): wrote {output} unchanged" in out
    assert "0 Conv(s) rewritten" in out and "target already met" in out.split("body")[1]


def test_existing_output_is_replaced_and_the_line_says_so(capsys, model_file):
    output = model_file.with_name("net.gdws.onnx")
    output.write_bytes(b"an older result")
    code, out, err = gdws_deploy(capsys, "convert", model_file, "--beta", "0")
    assert code == 0, err
    assert f"replaced {output}" in out and "wrote" not in out
    onnx.checker.check_model(onnx.load(str(output)), full_check=True)


BAD_FLAGS = [
    (["--beta", "-1"], "beta must be a finite number >= 0"),
    (["--beta", "abc"], "--beta must be a number"),
    (["--mac-reduction", "0.5"], "MAC reduction must be a finite number >= 1"),
    (["--budget", "0"], "budget must be a whole number"),
    (["--beta", "0", "--mac-reduction", "2"], "give exactly one of beta, budget, mac_reduction"),
    (["--alphas", "missing.npz", "--beta", "0"], "cannot read alphas from missing.npz: no such"),
    (["--alphas", "alphas.txt", "--beta", "0"], "alphas.txt: not an npz archive"),
    (["--speedup", "1.5"], "--speedup and --speed-ratio are measured: give --tune ort|trt"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flags_fail_in_one_line_and_write_nothing(
    capsys, model_file, flags, message, monkeypatch
):
    monkeypatch.chdir(model_file.parent)
    Path("alphas.txt").write_text("conv0 1.0 0.5\n")
    before = files(model_file.parent)
    code, _, err = gdws_deploy(capsys, "convert", model_file, *flags)
    assert_one_line_error(code, err, message)
    assert files(model_file.parent) == before


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"plain text, no protobuf here\n", "not a readable ONNX model"),
    ],
)
def test_unreadable_models_fail_in_one_line(capsys, tmp_path, content, message):
    source = tmp_path / "model.onnx"
    if content is not None:
        source.write_bytes(content)
    before = files(tmp_path)
    code, _, err = gdws_deploy(capsys, "convert", source, "--beta", "0")
    assert_one_line_error(code, err, message)
    assert files(tmp_path) == before


def test_truncated_model_fails_in_one_line(capsys, model_file):
    model_file.write_bytes(model_file.read_bytes()[:-100])
    before = files(model_file.parent)
    code, _, err = gdws_deploy(capsys, "convert", model_file, "--beta", "0")
    assert_one_line_error(code, err, "not a readable ONNX model")
    assert files(model_file.parent) == before


def test_output_equal_to_input_is_refused_and_the_input_kept(capsys, model_file):
    before = files(model_file.parent)
    code, _, err = gdws_deploy(capsys, "convert", model_file, "-o", model_file, "--beta", "0")
    assert_one_line_error(code, err, "is the input file")
    assert files(model_file.parent) == before


def test_unwritable_output_directory_fails_in_one_line(capsys, model_file, unwritable_dir):
    before = files(model_file.parent)
    out = unwritable_dir / "net.gdws.onnx"
    code, _, err = gdws_deploy(capsys, "convert", model_file, "-o", out, "--beta", "0")
    assert_one_line_error(code, err, str(unwritable_dir))
    assert not out.exists() and files(model_file.parent) == before


def test_console_script_reports_errors_without_traceback(tmp_path):
    missing = tmp_path / "missing.onnx"
    script = "from gdws_deploy.cli import main; import sys; sys.exit(main())"
    result = subprocess.run(
        [sys.executable, "-c", script, "convert", str(missing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert_one_line_error(result.returncode, result.stderr, "does not exist")
    assert result.stdout == ""


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("gdws-deploy: error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_help_prints_percent_signs_once(capsys):
    code, out, _ = gdws_deploy(capsys, "convert", "--help")
    assert code == 0
    assert "80 % of its share" in " ".join(out.split()) and "%%" not in out


def test_large_parity_deviation_warns_in_one_line_and_small_does_not(capsys, tmp_path):
    source = tmp_path / "dense.onnx"
    onnx.save(conv_chain([ConvSpec(8, weights="random") for _ in range(2)]), str(source))
    code, out, err = gdws_deploy(capsys, "convert", source, "--budget", "1")
    assert code == 0 and "wrote" in out
    assert float(out.split("onnxruntime) ")[1].split()[0]) > 0.05
    lines = tuned_warnings(err)
    assert len(lines) == 1 and lines[0].startswith("warning: outputs deviate from MODEL's by")
    onnx.save(conv_chain([ConvSpec(8), ConvSpec(8)]), str(source))  # exactly low rank
    code, _, err = gdws_deploy(capsys, "convert", source, "--beta", "0")
    assert code == 0 and tuned_warnings(err) == []


@pytest.mark.usefixtures("one_torch_thread")
def test_max_robust_drop_kept_by_no_target_shows_the_search_then_fails_in_one_line(
    capsys, tmp_path
):
    model = export_trained_digits_cnn(tmp_path / "digits.onnx")
    before = files(tmp_path)
    code, out, err = gdws_deploy(
        capsys, "convert", model, "--max-robust-drop", 0, "--dataset", "digits",
        "--limit", 100, "--eps", "0.05", "--steps", 2,
    )  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "gdws-deploy: error: no conversion keeps the robust drop within 0 and the clean "
        "drop within 0: nothing written"
    )
    assert "search: fastest conversion" in out and "beyond" in out and "chosen" not in out
    assert files(tmp_path) == before


def test_convert_without_data_does_not_load_torch(model_file, tmp_path):
    """torch and the attacks cost more start-up than a whole small conversion: only a
    calibrated conversion (--dataset) may load them."""
    script = (
        "import sys\n"
        "from gdws_deploy.cli import main\n"
        f"code = main(['convert', {str(model_file)!r}, '-o', {str(tmp_path / 'out.onnx')!r}])\n"
        "assert code == 0, code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_an_untuned_conversion_says_so_and_a_tuned_one_does_not(capsys, model_file, tmp_path):
    """Plain convert lowers by rule for no backend: the output may run slower than the
    original, and the user must hear it (issue 13); a tuned one is never slower."""
    code, _, err = gdws_deploy(capsys, "convert", model_file, "-o", tmp_path / "a.onnx")
    assert code == 0 and "warning: untuned" in err and "--tune ort" in err
    _, report = convert(str(model_file), mac_reduction=2, all_layers=True)
    stderr = io.StringIO()
    tuned = ConvertOptions(mac_reduction=2, tune="ort")
    warnings(report, tuned, True, Console(file=stderr, width=200))
    assert report.converted and "untuned" not in stderr.getvalue()


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--method", "gkp", "--mac-reduction", "1.5"], "chain.gkp.onnx"),
        (["--method", "atmc", "--mac-reduction", "1.5"], "chain.atmc.onnx"),
        (["--mac-reduction", "1.5"], "chain.gdws.onnx"),
    ],
)
def test_the_default_output_is_named_after_the_method(tmp_path, flags, name):
    source = tmp_path / "chain.onnx"
    onnx.save(conv_chain([ConvSpec(8), ConvSpec(8)]), str(source))
    assert main(["convert", str(source), *flags]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["chain.onnx", name])
