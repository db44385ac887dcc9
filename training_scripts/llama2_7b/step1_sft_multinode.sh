#!/usr/bin/env bash
# Stage 1 SFT of Llama-2-7B (meta-llama/Llama-2-7b-hf) on Dahoas/rm-static; recipe: sft.yaml.
# On several nodes of 8 GPUs (80 GB): ZeRO-3, bf16; 4 per GPU, so the global batch grows with nodes.
#
# Start it on one node; HOSTFILE (default /job/hostfile; the script stops when it is missing),
# MASTER_ADDR, MASTER_PORT: see ds_multinode in common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/sft}; shift || true   # more arguments: extra flags, passed on last

ds_multinode step1_sft/main.py --config "$HERE/sft.yaml" \
    --zero_stage 3 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
    -- "$@"
