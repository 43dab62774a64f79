# The README's two commands. Both build the environment from nothing:
# torch goes in first, pinned, so no dependency can pull a multi-GB CUDA build.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= out

.PHONY: demo test lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	touch $@

# The bundled robust model (PGD-trained at l_inf 4/255 on photo patches) swept at four
# MAC targets plus the fastest one losing <= 1 point of robust accuracy; accuracy on 200
# held-out test patches, the conversion calibrated on 200 training patches.
DEMO_MODEL ?= models/robust_photos.onnx
demo: $(STAMP)
	$(BIN)/gdws-deploy sweep $(DEMO_MODEL) --dataset photos --calib photos:train \
		--limit 200 --eps 4/255 --steps 10 --mac-reductions 2.5,3,4,6 \
		--max-robust-drop 0.01 --tune --out $(OUT)/sweep

# What runs on the Jetson (JetPack 5: Python 3.8) must parse and run there.
DEVICE_SIDE := gdws_deploy/runtime jetson gdws_deploy/__init__.py gdws_deploy/atomic.py \
	gdws_deploy/errors.py gdws_deploy/cli.py gdws_deploy/robustness/__init__.py \
	gdws_deploy/robustness/data.py gdws_deploy/robustness/photo_patches.py gdws_deploy/commands/__init__.py \
	gdws_deploy/commands/build.py gdws_deploy/commands/bench.py gdws_deploy/commands/trtexec.py \
	gdws_deploy/commands/args/__init__.py gdws_deploy/commands/args/base.py \
	gdws_deploy/commands/args/shapes.py gdws_deploy/commands/args/device.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/vermin -q --no-tips --violations -t=3.8- $(DEVICE_SIDE)
	$(BIN)/hadolint Dockerfile.l4t
	$(BIN)/shellcheck jetson/*.sh

test: lint
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) $(OUT)
