#!/usr/bin/env bash
# Stage 2 TLCR token discriminator (--model_type token) of Llama-2-7B; recipe: discriminator.yaml.
# On 1 GPU (80 GB) + ~150 GB CPU RAM: ZeRO-3, CPU offload, bf16; global batch 4 x 16 accum = 64.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."                    # the repo root: relative paths below start here
OUTPUT=${1:-output/llama2_7b/disc}; shift || true   # more arguments: extra flags
SFT_MODEL=${SFT_MODEL:-output/llama2_7b/sft}            # stage-1 output dir (its hf_export/)
REVISION_DATA=${REVISION_DATA:-data/revisions}          # folder of prompt/rejected/revised jsonl
mkdir -p "$OUTPUT"

deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29500}" step2_reward/main.py \
    --config "$HERE/discriminator.yaml" \
    --model_name_or_path "$SFT_MODEL" --data_path "$REVISION_DATA" \
    --zero_stage 3 --offload --per_device_train_batch_size 4 --gradient_accumulation_steps 16 \
    --output_dir "$OUTPUT" --resume --enable_tensorboard \
    --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
