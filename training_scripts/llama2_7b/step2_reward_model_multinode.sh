#!/usr/bin/env bash
# Stage 2 sequence reward model (--model_type sequence) of Llama-2-7B; recipe: reward_model.yaml.
# On several nodes of 8 GPUs (80 GB): ZeRO-2, bf16; 8 per GPU, so the global batch grows with nodes.
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
OUTPUT=${1:-output/llama2_7b/rm}; shift || true   # more arguments: extra flags
SFT_MODEL=${SFT_MODEL:-output/llama2_7b/sft}            # stage-1 output dir (its hf_export/)
HOSTFILE=${HOSTFILE:-/job/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (set HOSTFILE)" >&2; exit 1; }
MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")}
mkdir -p "$OUTPUT"

deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" step2_reward/main.py \
    --config "$HERE/reward_model.yaml" \
    --model_name_or_path "$SFT_MODEL" \
    --zero_stage 2 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
    --output_dir "$OUTPUT" --resume --enable_tensorboard \
    --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
