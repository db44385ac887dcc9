#!/usr/bin/env bash
# Stage 1 SFT of Llama-2-7B (meta-llama/Llama-2-7b-hf) on Dahoas/rm-static; recipe: sft.yaml.
# On several nodes of 8 GPUs (80 GB): ZeRO-3, bf16; 4 per GPU, so the global batch grows with nodes.
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
OUTPUT=${1:-output/llama2_7b/sft}; shift || true   # more arguments: extra flags
HOSTFILE=${HOSTFILE:-/job/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (set HOSTFILE)" >&2; exit 1; }
MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")}
mkdir -p "$OUTPUT"

deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" step1_sft/main.py \
    --config "$HERE/sft.yaml" \
    --zero_stage 3 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
    --output_dir "$OUTPUT" --resume --enable_tensorboard \
    --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
