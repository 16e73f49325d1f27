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

# The demo: MLPNet pruned one-shot by magnitude and by WoodFisher (one sweep; the dense
# model is trained once and cached), then the 90% WoodFisher model exported, checked
# and timed. A second `make demo` reuses the finished runs.
DEMO := runs/demo
WF   := NM_DISABLE_ANALYTICS=1 $(BIN)/wfcore
WFRUN := $(DEMO)/estimator.name=woodfisher

demo: $(STAMP)
	$(WF) sweep configs/mnist_mlpnet.yaml estimator.name=magnitude,woodfisher output=$(DEMO)
	$(WF) export $(WFRUN) --sparsity 0.9
	$(WF) bench $(WFRUN)/model_step2.onnx --dense $(WFRUN)/dense.onnx --batch-size 16 \
		--engines deepsparse,onnxruntime,torch --threads 1

test: $(STAMP)
	NM_DISABLE_ANALYTICS=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	NM_DISABLE_ANALYTICS=1 $(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check wfcore plugins export tests benchmarks

bench: $(STAMP)
	NM_DISABLE_ANALYTICS=1 $(BIN)/python benchmarks/estimator_speed.py --quick
	NM_DISABLE_ANALYTICS=1 $(BIN)/python benchmarks/cpu_speedup.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
