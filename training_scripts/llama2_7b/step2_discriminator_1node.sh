#!/usr/bin/env bash
# Stage 2 TLCR token discriminator (--model_type token) of Llama-2-7B; recipe: discriminator.yaml.
# On one node of 8 GPUs (80 GB): ZeRO-2, bf16; global batch 8 per GPU x 8 = 64.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/disc}; shift || true   # more arguments: extra flags, passed on last

ds_single_node 8 step2_reward/main.py --config "$HERE/discriminator.yaml" \
    --model_name_or_path "$SFT_MODEL" --data_path "$REVISION_DATA" \
    --zero_stage 2 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
    -- "$@"
