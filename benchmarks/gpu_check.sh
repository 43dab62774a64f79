#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: the tests marked `gpu` (CUDA torch,
# onnxruntime-gpu's providers, TensorRT where installed) and the GPU benchmark
# (PreActResNet-18, PGD-5 at batch 256: GPU against one CPU process; goal >= 50x).
# Run from the repository root on a CUDA machine, in an environment with a CUDA torch and
# gdws-deploy[gpu,test] (onnxruntime-gpu, never together with onnxruntime):
#     bash benchmarks/gpu_check.sh [python]
set -euo pipefail
PYTHON=${1:-.venv/bin/python}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA GPU")'
"$PYTHON" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
"$PYTHON" -m pytest -q -p no:randomly -m gpu tests/test_device.py
PYTHONPATH=. "$PYTHON" benchmarks/eval_scaling.py --gpu --workers 0 --batch 256 \
    --samples 64 --gpu-samples 2048 --repeat 1
