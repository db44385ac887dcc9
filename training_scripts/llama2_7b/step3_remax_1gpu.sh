#!/usr/bin/env bash
# Stage 3 ReMax of Llama-2-7B from the SFT and reward-model outputs; recipe: remax.yaml.
# On 1 GPU (80 GB) + ~150 GB CPU RAM: actor ZeRO-3 + CPU offload, reference and reward ZeRO-3
# with weights on CPU, bf16; 8 prompts per step (2 micro-batches of 4, one optimizer step).
# The hybrid engine is left off: under ZeRO-3 with parameter offload the weights are gathered
# from CPU once per generation either way (add --enable_hybrid_engine to try it).
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

deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29500}" step3_rlhf/main.py \
    --config "$HERE/remax.yaml" \
    --actor_model_name_or_path "$SFT_MODEL" --reward_model_name_or_path "$REWARD_MODEL" \
    --reward_calculator "$CALCULATOR" ${DISC[@]+"${DISC[@]}"} \
    --actor_zero_stage 3 --reference_zero_stage 3 --reward_zero_stage 3 \
    --offload --offload_reference_model --offload_reward_model \
    --per_device_generation_batch_size 8 --per_device_training_batch_size 4 \
    --output_dir "$OUTPUT" --resume --enable_tensorboard \
    --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
