# Sourced (not run) by the tiny launch scripts, after their `set -euo pipefail`; pipefail makes
# a run's exit status deepspeed's, not tee's. On sourcing it `cd`s to the repo root (relative
# paths start there), finds deepspeed and sets the shared environment and defaults:
cd "$(dirname "${BASH_SOURCE[0]}")/../.."                       # the repo root
command -v deepspeed >/dev/null || PATH="$PWD/.venv/bin:$PATH"  # the venv of `make install`
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1   # 2 ranks on 2 cores; everything is local
SFT_MODEL=${SFT_MODEL:-output/tiny/sft}     # stage-1 output dir (its hf_export/): stage 2's start,
                                            # stage 3's actor and reference
REWARD_MODEL=${REWARD_MODEL:-output/tiny/rm}    # stage-2 reward model (and PPO critic init)
DISC_MODEL=${DISC_MODEL:-output/tiny/disc}      # stage-2 TLCR discriminator

# ds_tiny ENTRY.py FLAGS... [-- EXTRA...]: 2 DeepSpeed ranks on CPU (gloo), port MASTER_PORT
# (default 29500), running ENTRY.py FLAGS... --output_dir "$OUTPUT" EXTRA... (EXTRA: the
# script's arguments, last so they override), appended to $OUTPUT/training.log.
ds_tiny() {
    local flags=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do flags+=("$1"); shift; done
    if [ $# -gt 0 ]; then shift; fi
    mkdir -p "$OUTPUT"
    deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" "${flags[@]}" \
        --output_dir "$OUTPUT" "$@" \
        2>&1 | tee -a "$OUTPUT/training.log"
}
