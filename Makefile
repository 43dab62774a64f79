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

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/vermin -q --no-tips --violations -t=3.8- gdws_deploy/runtime jetson
	$(BIN)/hadolint Dockerfile.l4t

test: lint
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) $(OUT)
