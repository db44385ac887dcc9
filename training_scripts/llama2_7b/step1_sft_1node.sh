#!/usr/bin/env bash
# Stage 1 SFT of Llama-2-7B (meta-llama/Llama-2-7b-hf) on Dahoas/rm-static; recipe: sft.yaml.
# On one node of 8 GPUs (80 GB): ZeRO-3, bf16; global batch 4 per GPU x 8 = 32.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/sft}; shift || true   # more arguments: extra flags, passed on last

ds_single_node 8 step1_sft/main.py --config "$HERE/sft.yaml" \
    --zero_stage 3 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
    -- "$@"
