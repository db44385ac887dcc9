#!/usr/bin/env bash
# Stage 3 PPO of Llama-2-7B from the SFT and reward-model outputs; recipe: ppo.yaml.
# On 1 GPU (80 GB) + ~250 GB CPU RAM: actor and critic ZeRO-3 + CPU offload, reference and reward
# ZeRO-3 with weights on CPU, bf16; 8 prompts per rollout, 2 PPO updates of 4.
# Why ~250 GB: two trained 7B models (actor, critic) at 16 B/param each and two frozen ones at
# 2 B/param, ~36 B/param in all (243 GB); it fits no single 141 GB GPU + 128 GiB host either.
# The hybrid engine is left off: under ZeRO-3 with parameter offload the weights are gathered
# from CPU once per generation either way (add --enable_hybrid_engine to try it).
# Env: SFT_MODEL, REWARD_MODEL, CALCULATOR (--reward_calculator, default abc), DISC_MODEL
# (TLCR discriminator, passed for tlcr and composite only), SAVE_STEPS, EVAL_STEPS, MASTER_PORT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/ppo_$CALCULATOR}; shift || true   # more arguments: extra flags, passed on last
rl_models                              # RL_MODELS: actor, reward, calculator (+ discriminator)

ds_single_node 1 step3_rlhf/main.py --config "$HERE/ppo.yaml" "${RL_MODELS[@]}" \
    --actor_zero_stage 3 --critic_zero_stage 3 --reference_zero_stage 3 --reward_zero_stage 3 \
    --offload --offload_reference_model --offload_reward_model \
    --per_device_generation_batch_size 8 --per_device_training_batch_size 4 \
    -- "$@"
