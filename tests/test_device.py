"""--device and --providers: what a spec means here, and which onnxruntime providers run."""

from __future__ import annotations

import pytest
import torch

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.device import default_batch, resolve_device, verdict_providers
from gdws_deploy.runtime.providers import (
    CPU,
    CUDA,
    TENSORRT,
    choose_providers,
    ort_providers,
    parse_device,
    parse_providers,
    provider_names,
)

NO_GPU = not torch.cuda.is_available()
GPU_ORT = [TENSORRT, CUDA, CPU]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("auto", ("auto", None)),
        ("cpu", ("cpu", None)),
        ("cuda", ("cuda", None)),
        ("cuda:1", ("cuda", 1)),
        (" CUDA:0 ", ("cuda", 0)),
    ],
)
def test_device_specs_parse(text, parsed):
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cpu:0", "auto:1", "cuda:x", ""])
def test_bad_device_spec_is_one_line_naming_the_choices(text):
    with pytest.raises(GdwsError, match=r"--device must be auto, cpu, cuda or cuda:N"):
        parse_device(text)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible")
def test_auto_means_the_cpu_where_torch_sees_no_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_line(spec):
    with pytest.raises(GdwsError, match=rf"^--device {spec}: torch .* sees no CUDA GPU; use "):
        resolve_device(spec)


def test_default_batch_scales_only_on_a_gpu():
    assert default_batch(torch.device("cpu"), 128) == 128
    assert default_batch(torch.device("cuda", 0), 128) == 512


def test_providers_short_names_map_to_onnxruntimes_in_order_without_repeats():
    assert parse_providers("trt, cuda,cpu,CUDA") == [TENSORRT, CUDA, CPU]
    assert parse_providers("CUDAExecutionProvider") == [CUDA]
    assert parse_providers(None) is None and parse_providers(" ") is None
    with pytest.raises(GdwsError, match="--providers: unknown provider 'rocm'"):
        parse_providers("cuda,rocm")


def test_cuda_device_takes_tensorrt_then_cuda_then_cpu_where_installed():
    assert choose_providers("cuda", None, GPU_ORT) == [TENSORRT, CUDA, CPU]
    assert choose_providers("cuda", None, [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cuda", 1, GPU_ORT) == [
        (TENSORRT, {"device_id": 1}),
        (CUDA, {"device_id": 1}),
        CPU,
    ]


def test_cpu_device_or_cpu_only_onnxruntime_runs_on_the_cpu():
    assert choose_providers("cpu", None, GPU_ORT) == [CPU]
    assert choose_providers("cuda", 0, ["AzureExecutionProvider", CPU]) == [CPU]


def test_requested_providers_are_kept_and_each_must_be_installed():
    assert choose_providers("cpu", None, GPU_ORT, [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(GdwsError, match=r"no CUDAExecutionProvider .* gdws-deploy\[gpu\]"):
        choose_providers("cuda", 0, [CPU], [CUDA])


def test_providers_here_follow_the_installed_onnxruntime():
    import onnxruntime

    assert provider_names(ort_providers("cpu")) == [CPU]
    expected = [CUDA, CPU] if CUDA in onnxruntime.get_available_providers() else [CPU]
    assert provider_names(ort_providers("auto"))[-len(expected) :] == expected
    assert provider_names(verdict_providers(torch.device("cpu"))) == [CPU]


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_auto_means_the_first_gpu_where_torch_sees_one():
    assert resolve_device("auto") == torch.device("cuda", 0)
    count = torch.cuda.device_count()
    with pytest.raises(GdwsError, match=f"torch sees {count} GPU"):
        resolve_device(f"cuda:{count}")


def test_tune_backend_names_its_providers_and_keeps_the_cpu_cache_key():
    import onnxruntime

    from gdws_deploy.speed.backends import OrtBackend, backend_named

    assert OrtBackend(2).name == f"onnxruntime-{onnxruntime.__version__}-cpu-threads2"
    gpu = backend_named("ort", 0, [(CUDA, {"device_id": 0}), CPU])
    assert gpu.name.endswith("-CUDA+CPU-threads0")


def test_bench_on_a_provider_this_onnxruntime_lacks_is_one_line(tmp_path, capsys):
    import onnxruntime

    from tests.cli_run import assert_one_line_error, run_cli
    from tests.runtime_models import small_cnn

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    model = small_cnn(tmp_path / "small.onnx")
    result = run_cli(capsys, "bench", model, "--providers", "cuda", "--duration", "0")
    assert_one_line_error(result, "this onnxruntime has no CUDAExecutionProvider")


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_attacks_alphas_and_verdicts_on_the_gpu_agree_with_the_cpu(tmp_path):
    import numpy as np
    import onnxruntime

    from gdws_deploy.robustness.alphas import compute_alphas
    from gdws_deploy.robustness.attacks import make_attacks
    from gdws_deploy.robustness.data import load_dataset
    from gdws_deploy.robustness.evaluate import Judge, evaluate
    from tests.digits_fixtures import export_trained_digits_cnn

    model = export_trained_digits_cnn(tmp_path / "digits.onnx")
    data = load_dataset("digits", limit=64)
    attacks = make_attacks("pgd-linf", {"*": 0.1}, steps=5)
    cpu, gpu = (
        evaluate(model, data, attacks, batch_size=32, seed=1, device=d) for d in ("cpu", "cuda")
    )
    assert gpu.clean_acc == cpu.clean_acc
    assert abs(gpu.robust_acc - cpu.robust_acc) <= 2 / len(data)  # a borderline sample may flip
    on_cpu, on_gpu = (
        compute_alphas(model, data, attacks[0], batch_size=32, device=d).alphas
        for d in ("cpu", "cuda")
    )
    for name, value in on_cpu.items():
        np.testing.assert_allclose(on_gpu[name], value, rtol=1e-2)
    if CUDA in onnxruntime.get_available_providers():
        judge = Judge(model, device="cuda", channels=1)
        assert CUDA in provider_names(judge.runner.providers)
