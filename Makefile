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
	touch $@

demo: $(STAMP)
	$(BIN)/python -m gdws_deploy.demo --out $(OUT)

# What runs on the Jetson (JetPack 5: Python 3.8) must parse and run there.
DEVICE_SIDE := gdws_deploy/runtime jetson gdws_deploy/__init__.py gdws_deploy/atomic.py \
	gdws_deploy/errors.py gdws_deploy/cli.py gdws_deploy/data.py gdws_deploy/commands/__init__.py \
	gdws_deploy/commands/build.py gdws_deploy/commands/bench.py gdws_deploy/commands/trtexec.py \
	gdws_deploy/commands/trt_flags.py

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
