# hmkd: the two commands of the README, and a few helpers.
# `make demo` and `make test` each set up .venv (torch from this machine's disk, see README) first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo demo-quick test clean

$(BIN)/hmkd: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/hmkd

setup: $(BIN)/hmkd

demo: setup
	$(BIN)/hmkd demo --out runs/demo

demo-quick: setup
	$(BIN)/hmkd demo --quick --out runs/demo-quick

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs .pytest_cache
