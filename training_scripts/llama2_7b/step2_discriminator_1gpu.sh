#!/usr/bin/env bash
# Stage 2 TLCR token discriminator (--model_type token) of Llama-2-7B; recipe: discriminator.yaml.
# On 1 GPU (80 GB) + ~150 GB CPU RAM: ZeRO-3, CPU offload, bf16; global batch 4 x 16 accum = 64.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/disc}; shift || true   # more arguments: extra flags, passed on last

ds_single_node 1 step2_reward/main.py --config "$HERE/discriminator.yaml" \
    --model_name_or_path "$SFT_MODEL" --data_path "$REVISION_DATA" \
    --zero_stage 3 --offload --per_device_train_batch_size 4 --gradient_accumulation_steps 16 \
    -- "$@"
