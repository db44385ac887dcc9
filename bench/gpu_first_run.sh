#!/usr/bin/env bash
# The first GPU run: one script of at most ~8 minutes that returns numbers even when a part
# fails. Made for the device machine (one H200, 16 cores, 128 GiB host memory, 64 GiB disk,
# Python 3.12, torch + CUDA, transformers; no deepspeed, no datasets, no network):
#
#   bash bench/build_wheels.sh                      # here, once: bench/wheels
#   bash bench/gpu_first_run.sh                     # there: the device tool's run, carry ["bench/wheels"]
#   bash bench/gpu_first_run.sh --dry-run           # CPU, tiny shapes, 1-2 min (the test suite runs this)
#
# Into $OUT (the folder the device tool returns; default bench/results/first_run), as it goes:
#   results.jsonl   one line per part: {"part", "rc", "seconds", "result"} (result: the part's JSON)
#   log.txt         every part's output
#   nvidia_smi.csv  GPU utilisation and memory every 2 s (GPU only)
#   summary.md      the table at the end
# Parts, each under its own timeout (a part that times out or fails is recorded; the next runs):
#   machine    GPU, driver, host memory, disk, compilers, library versions
#   models     the random-weight 7B and 1.3B folders, built once before anything is timed
#   rlhf_1b3   ReMax and PPO on the 1.3B shape, every model on the GPU: memory ratio, samples/s, step split
#   sft_7b     7B SFT, ZeRO-3 without offload, gradient checkpointing, 4 x 512 tokens: tokens/s, MFU, memory
#   remax_7b   7B ReMax as it fits one GPU: actor ZeRO-3 on the GPU, reference and reward offloaded
# Memory arithmetic per recipe: bench/README.md ("The first GPU run").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-bench/results/first_run}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl" LOG="$OUT/log.txt" WORK=$(mktemp -d)
: > "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if (( DRY )); then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    SMALL=(--small) LIMIT_MODELS=120 LIMIT_1B3=240 LIMIT_SFT=240 LIMIT_7B=240 BIG=tiny MID=tiny
else
    SMALL=() LIMIT_MODELS=100 LIMIT_1B3=110 LIMIT_SFT=110 LIMIT_7B=150 BIG=llama2_7b MID=llama_1b3
fi

# part NAME LIMIT_S CMD...: run CMD (which writes $WORK/NAME.json) under a timeout, append its line
part() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s.%N)
    echo "=== $name (limit ${limit}s): $*" >> "$LOG"
    timeout -k 15 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    "$PY" - "$name" "$rc" "$start" "$WORK/$name.json" >> "$RESULTS" <<'EOF'
import json, sys, time
from pathlib import Path
name, rc, start, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
result = json.loads(path.read_text()) if path.is_file() else None
print(json.dumps({"part": name, "rc": rc, "timed_out": rc in (124, 137),
                  "seconds": round(time.time() - start, 1), "result": result}))
EOF
    echo "$name: exit $rc" >&2
}

if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total,power.draw \
        --format=csv -l 2 > "$OUT/nvidia_smi.csv" 2>&1 &
    SMI=$!
    trap 'kill $SMI 2> /dev/null; rm -rf "$WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi

part machine 60 "$PY" - "$WORK/machine.json" <<'EOF'
import json, os, shutil, subprocess, sys
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # a missing tool is a fact about the machine, not a failure
        return f"unavailable: {e}"
sys.path.insert(0, "bench")
import harness
harness.ensure_deepspeed()  # installs the carried wheels once (no network there)
import torch, transformers, deepspeed
free = shutil.disk_usage(".")
info = {"gpu": sh("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"),
        "host_memory": sh("free -g | sed -n 2p"), "disk_free_gb": round(free.free / 2**30, 1),
        "nproc": os.cpu_count(), "nvcc": sh("nvcc --version | tail -1") or "none", "gcc": sh("gcc --version | head -1"),
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        "cuda_available": torch.cuda.is_available()}
json.dump(info, open(sys.argv[1], "w"))
print(json.dumps(info, indent=1))
EOF

part models "$LIMIT_MODELS" "$PY" - "$WORK/models.json" "$BIG" "$MID" <<'EOF'
import json, sys, time
sys.path.insert(0, "bench")
import torch
from harness import model_folder
gpu = torch.cuda.is_available()
out = {}
for shape in dict.fromkeys(sys.argv[2:]):
    t = time.time()
    for head in ("causal", "reward", "token"):  # the heads link the causal folder's weights
        out[f"{shape}/{head}"] = model_folder(shape, head, "cuda" if gpu else "cpu", torch.bfloat16 if gpu else torch.float32)
    out[f"{shape}_seconds"] = round(time.time() - t, 1)
json.dump(out, open(sys.argv[1], "w"))
EOF

# (1) ReMax vs PPO, 1.3B, every model on the GPU (ZeRO-2 actor and critic, frozen models unsharded)
part rlhf_1b3 "$LIMIT_1B3" "$PY" bench/gpu_stage3.py "${SMALL[@]}" --shape "$MID" --algos remax ppo --no-decode \
    --batch 8 --train_batch 4 --prompt_len 256 --answer_len 256 --steps 2 --timeout $((LIMIT_1B3 / 2 - 10)) \
    --out "$WORK/rlhf_1b3.json" --flags --actor_zero_stage 2 --critic_zero_stage 2 \
    --reference_zero_stage 0 --reward_zero_stage 0 --gradient_checkpointing
# (2) 7B SFT: ZeRO-3 on the GPU (no offload), gradient checkpointing (the recipe's), 4 x 512 tokens
part sft_7b "$LIMIT_SFT" "$PY" bench/gpu_train.py "${SMALL[@]}" --shape "$BIG" --models sft --batch 4 --seq_len 512 \
    --gas 2 --steps 2 --warmup 1 --timeout $((LIMIT_SFT - 15)) --out "$WORK/sft_7b.json" --extra --no-offload
# (3) 7B ReMax as it fits: actor ZeRO-3 on the GPU, reference and reward ZeRO-3 with weights on the host
part remax_7b "$LIMIT_7B" "$PY" bench/gpu_stage3.py "${SMALL[@]}" --shape "$BIG" --algos remax --no-decode \
    --batch 8 --train_batch 4 --prompt_len 128 --answer_len 128 --steps 1 --timeout $((LIMIT_7B - 15)) \
    --out "$WORK/remax_7b.json" --flags --actor_zero_stage 3 --reference_zero_stage 3 --reward_zero_stage 3 \
    --offload_reference_model --offload_reward_model --gradient_checkpointing

"$PY" bench/first_run_summary.py "$RESULTS" > "$OUT/summary.md"
cat "$OUT/summary.md"
