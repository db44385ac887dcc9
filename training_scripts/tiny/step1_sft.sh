#!/usr/bin/env bash
# Stage 1 SFT of the tiny preset (4-layer Llama, 5M parameters) on the embedded IMDb task.
# On CPU: 2 DeepSpeed ranks (gloo), ZeRO-2, fp32. Env: OUTPUT, MAX_STEPS, MASTER_PORT; args: more flags.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; env, defaults, ds_tiny
OUTPUT=${OUTPUT:-output/tiny/sft}

ds_tiny step1_sft/main.py \
    --model_name_or_path tiny --data_path imdb --zero_stage 2 \
    --per_device_train_batch_size 8 --max_seq_len 96 \
    --learning_rate 1e-3 --num_warmup_steps 20 --max_steps "${MAX_STEPS:-300}" \
    --eval_steps 100 --save_steps 100 \
    -- "$@"
