#!/usr/bin/env bash
# Stage 3 ReMax of Llama-2-7B from the SFT and reward-model outputs; recipe: remax.yaml.
# On one node of 8 GPUs (80 GB): actor ZeRO-2, reference and reward ZeRO-3, bf16, hybrid engine;
# 4 prompts per GPU, 32 per step.
# Env: SFT_MODEL, REWARD_MODEL, CALCULATOR (--reward_calculator, default abc), DISC_MODEL
# (TLCR discriminator, passed for tlcr and composite only), SAVE_STEPS, EVAL_STEPS, MASTER_PORT.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."                    # the repo root: relative paths below start here
CALCULATOR=${CALCULATOR:-abc}          # sparse, uniform, abc, abc_d, tlcr, composite
OUTPUT=${1:-output/llama2_7b/remax_$CALCULATOR}; shift || true   # more arguments: extra flags
SFT_MODEL=${SFT_MODEL:-output/llama2_7b/sft}            # stage-1 output dir (its hf_export/)
REWARD_MODEL=${REWARD_MODEL:-output/llama2_7b/rm}       # stage-2 reward model
DISC_MODEL=${DISC_MODEL:-output/llama2_7b/disc}         # stage-2 TLCR discriminator
DISC=()                                 # the discriminator only for the calculators that read it
case $CALCULATOR in tlcr | composite) DISC=(--discriminator_model_name_or_path "$DISC_MODEL") ;; esac
mkdir -p "$OUTPUT"

deepspeed --num_gpus 8 --master_port "${MASTER_PORT:-29500}" step3_rlhf/main.py \
    --config "$HERE/remax.yaml" \
    --actor_model_name_or_path "$SFT_MODEL" --reward_model_name_or_path "$REWARD_MODEL" \
    --reward_calculator "$CALCULATOR" ${DISC[@]+"${DISC[@]}"} \
    --actor_zero_stage 2 --reference_zero_stage 3 --reward_zero_stage 3 --enable_hybrid_engine \
    --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
    --output_dir "$OUTPUT" --resume --enable_tensorboard \
    --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
