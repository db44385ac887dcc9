#!/usr/bin/env bash
# Stage 2 sequence reward model (Bradley-Terry) on the IMDb pairs, from the tiny SFT export.
# On CPU: 2 DeepSpeed ranks (gloo), ZeRO-2, fp32. Env: SFT_MODEL, OUTPUT, MAX_STEPS, MASTER_PORT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."                       # the repo root
command -v deepspeed >/dev/null || PATH="$PWD/.venv/bin:$PATH"  # the venv of `make install`
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1   # 2 ranks on 2 cores; everything is local
SFT_MODEL=${SFT_MODEL:-output/tiny/sft}     # stage-1 output dir (its hf_export/)
OUTPUT=${OUTPUT:-output/tiny/rm}
mkdir -p "$OUTPUT"

deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" step2_reward/main.py \
    --model_type sequence --model_name_or_path "$SFT_MODEL" \
    --data_path imdb --zero_stage 2 \
    --per_device_train_batch_size 8 --max_seq_len 96 \
    --learning_rate 5e-4 --num_warmup_steps 10 --max_steps "${MAX_STEPS:-150}" \
    --eval_steps 50 --save_steps 50 --output_dir "$OUTPUT" "$@" \
    2>&1 | tee -a "$OUTPUT/training.log"
