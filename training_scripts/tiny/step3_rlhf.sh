#!/usr/bin/env bash
# Stage 3 RL (ReMax or PPO) of the tiny SFT export against the tiny reward model, on the IMDb prompts.
# On CPU: 2 DeepSpeed ranks (gloo), actor ZeRO-2, reference and reward model unsharded, fp32.
# Env: SFT_MODEL, REWARD_MODEL, DISC_MODEL, ALGO (remax|ppo), CALCULATOR (--reward_calculator),
# OUTPUT, MAX_STEPS, MASTER_PORT; args: more flags.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; env, defaults, ds_tiny
ALGO=${ALGO:-remax}
CALCULATOR=${CALCULATOR:-abc}               # sparse, uniform, abc, abc_d, tlcr, composite
OUTPUT=${OUTPUT:-output/tiny/${ALGO}_${CALCULATOR}}
DISC=()                                     # the discriminator only for the calculators that read it
case $CALCULATOR in tlcr | composite) DISC=(--discriminator_model_name_or_path "$DISC_MODEL") ;; esac

ds_tiny step3_rlhf/main.py \
    --algo "$ALGO" --reward_calculator "$CALCULATOR" \
    --actor_model_name_or_path "$SFT_MODEL" --reward_model_name_or_path "$REWARD_MODEL" \
    ${DISC[@]+"${DISC[@]}"} --data_path imdb \
    --actor_zero_stage 2 --reference_zero_stage 0 --reward_zero_stage 0 \
    --per_device_generation_batch_size 16 --per_device_training_batch_size 8 \
    --max_prompt_seq_len 16 --max_answer_seq_len 16 \
    --actor_learning_rate 5e-5 --kl_ctl 0.1 --max_steps "${MAX_STEPS:-60}" \
    --eval_steps 20 --save_steps 20 --max_eval_samples 64 \
    -- "$@"
