#!/usr/bin/env bash
# Stage 2 personalised reward model (VPL) on the Pets users, embeddings from the tiny SFT export.
# On CPU: 2 DeepSpeed ranks (gloo), ZeRO-2, fp32; the head trains on cached frozen embeddings.
# Env: SFT_MODEL, VARIANT (vae|base|mean_and_variance|categorical), DATA (pets|imdb_personal|a
# folder), OUTPUT, MAX_STEPS, MASTER_PORT; args: more flags (e.g. --vpl_target_embeddings lora --lora_dim 8).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; env, defaults, ds_tiny
VARIANT=${VARIANT:-vae}
DATA=${DATA:-pets}
OUTPUT=${OUTPUT:-output/tiny/vpl_${VARIANT}}

ds_tiny step2_reward/main.py \
    --model_type vpl --vpl_variant "$VARIANT" --model_name_or_path "$SFT_MODEL" \
    --data_path "$DATA" --zero_stage 2 \
    --per_device_train_batch_size 16 --max_seq_len 64 --num_train_epochs 50 \
    --learning_rate 1e-3 --max_steps "${MAX_STEPS:-400}" \
    --eval_steps 100 --save_steps 100 \
    -- "$@"
