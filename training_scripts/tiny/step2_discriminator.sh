#!/usr/bin/env bash
# Stage 2 TLCR token discriminator on the IMDb rejected/revised rows, from the tiny SFT export.
# On CPU: 2 DeepSpeed ranks (gloo), ZeRO-2, fp32. Env: SFT_MODEL, OUTPUT, MAX_STEPS, MASTER_PORT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; env, defaults, ds_tiny
OUTPUT=${OUTPUT:-output/tiny/disc}

ds_tiny step2_reward/main.py \
    --model_type token --model_name_or_path "$SFT_MODEL" \
    --data_path imdb --zero_stage 2 \
    --per_device_train_batch_size 8 --max_seq_len 96 \
    --learning_rate 5e-4 --num_warmup_steps 10 --max_steps "${MAX_STEPS:-150}" \
    --eval_steps 50 --save_steps 50 \
    -- "$@"
