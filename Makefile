# `make demo` and `make test` each set up .venv (Python 3.11) when it is missing or stale.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# deepsparse 1.8.0 (the last working release) pins onnx < 1.15 and numpy < 2; the extra
# installs it beside everything else in one environment (see README, "DeepSparse").
EXTRAS ?= dev,deepsparse

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	NM_DISABLE_ANALYTICS=1 $(BIN)/wfcore prune configs/mnist_mlpnet.yaml --force

test: $(STAMP)
	NM_DISABLE_ANALYTICS=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	NM_DISABLE_ANALYTICS=1 $(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check wfcore plugins export tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
