#!/usr/bin/env bash
# Builds bench/wheels/: what the GPU machine (PyTorch, transformers, accelerate, peft,
# sentencepiece, tensorboard; no deepspeed, no network) needs to run bench/gpu_*.py, which
# install from here (`pip install --no-index --find-links bench/wheels deepspeed`) when
# `import deepspeed` fails. Git-ignored: carry it with the run, never commit it.
#   deepspeed: the venv's version, an sdist built here into a pure-Python wheel;
#   its requirements that machine lacks, as binary wheels for its Python (3.12, x86-64 Linux),
#   at the venv's versions. Not datasets: the benchmarks never load a data set (densehf imports
#   it only inside the data loaders), and its pyarrow wheel alone would exceed the 64 MiB carry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-../.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12}
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p wheels
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ds=$(version deepspeed)
"$PY" -m pip download --no-deps --no-binary :all: "deepspeed==$ds" -d "$tmp"
"$PY" -m pip wheel --no-deps --no-build-isolation "$tmp/deepspeed-$ds.tar.gz" -w wheels
reqs=()
# typing-extensions: the pydantic pair needs >= 4.16, newer than some GPU images carry
for pkg in einops hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
    reqs+=("$pkg==$(version "$pkg")")
done
"$PY" -m pip download --no-deps --only-binary :all: --python-version "$TARGET_PY" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d wheels "${reqs[@]}"
ls -l wheels
