#!/usr/bin/env bash
# Stage 3 ReMax of Llama-2-7B from the SFT and reward-model outputs; recipe: remax.yaml.
# On 1 GPU (80 GB) + ~150 GB CPU RAM: actor ZeRO-3 + CPU offload, reference and reward ZeRO-3
# with weights on CPU, bf16; 8 prompts per step (2 micro-batches of 4, one optimizer step).
# Host memory, pinned: actor fp32 weights + Adam (12 B/param, 81 GB) and fp32 gradients (27 GB),
# reference and reward bf16 (27 GB): ~135 GB, more than a 128 GiB host holds. On one 141 GB-class
# GPU (H200) use step3_remax_1gpu_141gb.sh instead: the actor stays on the GPU.
# The hybrid engine is left off: under ZeRO-3 with parameter offload the weights are gathered
# from CPU once per generation either way (add --enable_hybrid_engine to try it).
# Env: SFT_MODEL, REWARD_MODEL, CALCULATOR (--reward_calculator, default abc), DISC_MODEL
# (TLCR discriminator, passed for tlcr and composite only), SAVE_STEPS, EVAL_STEPS, MASTER_PORT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"   # cd to the repo root; HERE, defaults, launchers
OUTPUT=${1:-output/llama2_7b/remax_$CALCULATOR}; shift || true   # more arguments: extra flags, passed on last
rl_models                              # RL_MODELS: actor, reward, calculator (+ discriminator)

ds_single_node 1 step3_rlhf/main.py --config "$HERE/remax.yaml" "${RL_MODELS[@]}" \
    --actor_zero_stage 3 --reference_zero_stage 3 --reward_zero_stage 3 \
    --offload --offload_reference_model --offload_reward_model \
    --per_device_generation_batch_size 8 --per_device_training_batch_size 4 \
    -- "$@"
