#!/usr/bin/env bash
# Stage 3 PPO of Llama-2-7B from the SFT and reward-model outputs; recipe: ppo.yaml.
# On several nodes of 8 GPUs (80 GB): actor and critic ZeRO-2 + optimizer offload, reference and
# reward ZeRO-3, bf16, hybrid engine; 4 prompts per GPU, so the rollout grows with nodes.
# Env: SFT_MODEL, REWARD_MODEL, CALCULATOR (--reward_calculator, default abc), DISC_MODEL
# (TLCR discriminator, passed for tlcr and composite only), SAVE_STEPS, EVAL_STEPS, MASTER_PORT.
#
# Start it on one node; DeepSpeed reaches the others with pdsh over passwordless ssh.
#   HOSTFILE     one line per node, `hostname slots=8` (default /job/hostfile, DeepSpeed's
#                own default). DeepSpeed trains on this node alone when the file is
#                missing, so the script stops instead.
#   MASTER_ADDR  where the other nodes reach rank 0 (default: the first host in HOSTFILE)
#   MASTER_PORT  its port (default 29500)
# Every node needs this repo, the Python env and OUTPUT at the same path (shared storage).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."                    # the repo root: relative paths below start here
CALCULATOR=${CALCULATOR:-abc}          # sparse, uniform, abc, abc_d, tlcr, composite
OUTPUT=${1:-output/llama2_7b/ppo_$CALCULATOR}; shift || true   # more arguments: extra flags
SFT_MODEL=${SFT_MODEL:-output/llama2_7b/sft}            # stage-1 output dir (its hf_export/)
REWARD_MODEL=${REWARD_MODEL:-output/llama2_7b/rm}       # stage-2 reward model and PPO critic init
DISC_MODEL=${DISC_MODEL:-output/llama2_7b/disc}         # stage-2 TLCR discriminator
DISC=()                                 # the discriminator only for the calculators that read it
case $CALCULATOR in tlcr | composite) DISC=(--discriminator_model_name_or_path "$DISC_MODEL") ;; esac
HOSTFILE=${HOSTFILE:-/job/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (set HOSTFILE)" >&2; exit 1; }
MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")}
mkdir -p "$OUTPUT"

deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" step3_rlhf/main.py \
    --config "$HERE/ppo.yaml" \
    --actor_model_name_or_path "$SFT_MODEL" --reward_model_name_or_path "$REWARD_MODEL" \
    --reward_calculator "$CALCULATOR" ${DISC[@]+"${DISC[@]}"} \
    --actor_zero_stage 2 --critic_zero_stage 2 --reference_zero_stage 3 --reward_zero_stage 3 \
    --offload --enable_hybrid_engine \
    --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
    --output_dir "$OUTPUT" --resume --enable_tensorboard \
    --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
