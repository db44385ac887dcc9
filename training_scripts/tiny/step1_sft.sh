#!/usr/bin/env bash
# Stage 1 SFT of the tiny preset (4-layer Llama, 5M parameters) on the embedded IMDb task.
# On CPU: 2 DeepSpeed ranks (gloo), ZeRO-2, fp32. Env: OUTPUT, MAX_STEPS, MASTER_PORT; args: more flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."                       # the repo root
command -v deepspeed >/dev/null || PATH="$PWD/.venv/bin:$PATH"  # the venv of `make install`
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1   # 2 ranks on 2 cores; everything is local
OUTPUT=${OUTPUT:-output/tiny/sft}
mkdir -p "$OUTPUT"

deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" step1_sft/main.py \
    --model_name_or_path tiny --data_path imdb --zero_stage 2 \
    --per_device_train_batch_size 8 --max_seq_len 96 \
    --learning_rate 1e-3 --num_warmup_steps 20 --max_steps "${MAX_STEPS:-300}" \
    --eval_steps 100 --save_steps 100 --output_dir "$OUTPUT" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
