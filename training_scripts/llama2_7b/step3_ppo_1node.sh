#!/usr/bin/env bash
# Stage 3 PPO of Llama-2-7B from the SFT and reward-model outputs; recipe: ppo.yaml.
# On one node of 8 GPUs (80 GB): actor and critic ZeRO-2 with optimizer states on CPU, reference
# and reward ZeRO-3 (TLCR's setup), bf16, hybrid engine; 4 prompts per GPU, 32 per rollout.
# Env: SFT_MODEL, REWARD_MODEL, CALCULATOR (--reward_calculator, default abc), DISC_MODEL
# (TLCR discriminator, passed for tlcr and composite only), SAVE_STEPS, EVAL_STEPS, MASTER_PORT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/ppo_$CALCULATOR}; shift || true   # more arguments: extra flags, passed on last
rl_models                              # RL_MODELS: actor, reward, calculator (+ discriminator)

ds_single_node 8 step3_rlhf/main.py --config "$HERE/ppo.yaml" "${RL_MODELS[@]}" \
    --actor_zero_stage 2 --critic_zero_stage 2 --reference_zero_stage 3 --reward_zero_stage 3 \
    --offload --enable_hybrid_engine \
    --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
    -- "$@"
