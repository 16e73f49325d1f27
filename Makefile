# `make demo` and `make test` each set up .venv (Python 3.11) when it is missing or stale.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# deepsparse 1.8.0 (the last working release) pins onnx < 1.15 and numpy < 2; the extra
# installs it beside everything else in one environment (see docs/export.md, "DeepSparse").
EXTRAS ?= dev,deepsparse,structured
SHELL  := /bin/bash

.PHONY: demo test test-all lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The demo: MLPNet pruned one-shot by magnitude and by WoodFisher (one sweep; the dense
# model is trained once and cached), the 90% WoodFisher model exported to float32 and INT8
# ONNX with its zeros and top-1 checked; then the speed-up, on a network large enough for
# sparsity to pay: torchvision's ResNet-50 with random weights (no trained weights ship),
# magnitude-pruned to 95%, exported to float32 and INT8 and timed against the dense model.
# The files are timed in rounds (each round runs every file on every engine once); the last
# line quotes the median of the per-round speed-ups (see docs/export.md, "Measured speed-up").
# A second `make demo` reuses the finished runs.
DEMO := runs/demo
WF   := NM_DISABLE_ANALYTICS=1 $(BIN)/wfcore
WFRUN := $(DEMO)/estimator.name=woodfisher
SPEED := runs/demo-resnet50

demo: $(STAMP)
	$(WF) sweep configs/mnist_mlpnet.yaml estimator.name=magnitude,woodfisher output=$(DEMO)
	$(WF) -q export $(WFRUN) --sparsity 0.9 --quantize int8
	@echo "ResNet-50 (torchvision, random weights: a speed test), pruned by magnitude in blocks of 4:"
	test -f $(SPEED)/model.int8.onnx || $(WF) -q prune configs/resnet50_speed.yaml \
		output=$(SPEED) --force > /dev/null
	$(WF) -q bench $(SPEED)/model.onnx $(SPEED)/model.int8.onnx --dense $(SPEED)/dense.onnx \
		--batch-size 16 --engines deepsparse,onnxruntime --warmup 2 --runs 7

# The tests run after the lint and the type check: any one failing fails `make test` (and CI).
test: lint typecheck
	NM_DISABLE_ANALYTICS=1 $(BIN)/python -m pytest -q

test-all: lint typecheck
	NM_DISABLE_ANALYTICS=1 $(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy checks the package as it is installed (plugins/ is wfcore.plugins, export/ is
# wfcore.export): a tree of links under build/typecheck gives it that layout, and the
# paths it prints are mapped back to the files in this checkout.
TYPECHECK := build/typecheck
typecheck: $(STAMP)
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/wfcore
	@ln -s $(CURDIR)/wfcore/* $(CURDIR)/plugins $(CURDIR)/export $(TYPECHECK)/wfcore/
	set -o pipefail; MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p wfcore \
		| sed -e 's#^$(TYPECHECK)/wfcore/\(plugins\|export\)/#\1/#' -e 's#^$(TYPECHECK)/##'

bench: $(STAMP)
	NM_DISABLE_ANALYTICS=1 $(BIN)/python benchmarks/estimator_speed.py --quick
	NM_DISABLE_ANALYTICS=1 $(BIN)/python benchmarks/cpu_speedup.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
