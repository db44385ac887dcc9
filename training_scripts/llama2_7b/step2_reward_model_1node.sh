#!/usr/bin/env bash
# Stage 2 sequence reward model (--model_type sequence) of Llama-2-7B; recipe: reward_model.yaml.
# On one node of 8 GPUs (80 GB): ZeRO-2, bf16; global batch 8 per GPU x 8 = 64.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."                    # the repo root: relative paths below start here
OUTPUT=${1:-output/llama2_7b/rm}; shift || true   # more arguments: extra flags
SFT_MODEL=${SFT_MODEL:-output/llama2_7b/sft}            # stage-1 output dir (its hf_export/)
mkdir -p "$OUTPUT"

deepspeed --num_gpus 8 --master_port "${MASTER_PORT:-29500}" step2_reward/main.py \
    --config "$HERE/reward_model.yaml" \
    --model_name_or_path "$SFT_MODEL" \
    --zero_stage 2 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
    --output_dir "$OUTPUT" --resume --enable_tensorboard \
    --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
