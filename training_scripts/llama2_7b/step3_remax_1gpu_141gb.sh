#!/usr/bin/env bash
# Stage 3 ReMax of Llama-2-7B on one 141 GB-class GPU (H200); recipe: remax.yaml.
# GPU, ~115 GB: actor ZeRO-3 *without* offload (bf16 weights and gradients 4 B/param + fp32 weights
# and Adam 12 B/param = 108 GB), gradient checkpointing (~2 GB of activations per 4 x 512
# micro-batch), generation's KV cache (8 x 512 tokens, ~2 GB). Host, ~30 GB: only the frozen
# reference and reward models (bf16, 13.5 GB each) are offloaded. 8 prompts per step.
# The hybrid engine is left off, as in the other recipes (add --enable_hybrid_engine to try it).
# Env: SFT_MODEL, REWARD_MODEL, CALCULATOR (--reward_calculator, default abc), DISC_MODEL
# (TLCR discriminator, passed for tlcr and composite only), SAVE_STEPS, EVAL_STEPS, MASTER_PORT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/remax_${CALCULATOR}_141gb}; shift || true   # more arguments: extra flags, passed on last
rl_models                              # RL_MODELS: actor, reward, calculator (+ discriminator)

ds_single_node 1 step3_rlhf/main.py --config "$HERE/remax.yaml" "${RL_MODELS[@]}" \
    --actor_zero_stage 3 --reference_zero_stage 3 --reward_zero_stage 3 \
    --offload_reference_model --offload_reward_model \
    --per_device_generation_batch_size 8 --per_device_training_batch_size 4 \
    -- "$@"
