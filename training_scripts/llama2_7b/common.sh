# Sourced (not run) by the llama2_7b launch scripts, after their `set -euo pipefail`; pipefail
# makes a run's exit status deepspeed's, not tee's. On sourcing it `cd`s to the repo root
# (relative paths start there), sets HERE to this folder (the YAML recipes) and the defaults:
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."
SFT_MODEL=${SFT_MODEL:-output/llama2_7b/sft}            # stage-1 output dir (its hf_export/)
REWARD_MODEL=${REWARD_MODEL:-output/llama2_7b/rm}       # stage-2 reward model (and PPO critic init)
DISC_MODEL=${DISC_MODEL:-output/llama2_7b/disc}         # stage-2 TLCR discriminator
REVISION_DATA=${REVISION_DATA:-data/revisions}          # folder of prompt/rejected/revised jsonl
CALCULATOR=${CALCULATOR:-abc}          # stage 3: sparse, uniform, abc, abc_d, tlcr, composite
# Each script then sets OUTPUT from its first argument (`OUTPUT=${1:-DEFAULT}; shift || true`)
# and calls one launcher below as `LAUNCHER ENTRY.py FLAGS... -- "$@"`. The launcher runs
#   deepspeed <its own flags> ENTRY.py FLAGS... --output_dir "$OUTPUT" --resume
#       --enable_tensorboard --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" EXTRA...
# with EXTRA (the script's remaining arguments) last, so they override the YAML and the script,
# and appends its output to $OUTPUT/training.log. Port: MASTER_PORT (default 29500).

# rl_models: RL_MODELS, stage 3's model flags: SFT_MODEL as actor (and reference), REWARD_MODEL,
# CALCULATOR as --reward_calculator, and DISC_MODEL only for the calculators that read it.
rl_models() {
    RL_MODELS=(--actor_model_name_or_path "$SFT_MODEL" --reward_model_name_or_path "$REWARD_MODEL"
        --reward_calculator "$CALCULATOR")
    case $CALCULATOR in tlcr | composite) RL_MODELS+=(--discriminator_model_name_or_path "$DISC_MODEL") ;; esac
}

# ds_single_node NUM_GPUS ENTRY.py FLAGS... [-- EXTRA...]: NUM_GPUS ranks on this node.
ds_single_node() {
    local gpus=$1; shift
    mkdir -p "$OUTPUT"
    _ds_launch --num_gpus "$gpus" --master_port "${MASTER_PORT:-29500}" ++ "$@"
}

# ds_multinode ENTRY.py FLAGS... [-- EXTRA...]: started on one node; DeepSpeed reaches the
# others with pdsh over passwordless ssh. Every node needs this repo, the Python env and OUTPUT
# at the same path (shared storage).
#   HOSTFILE     one line per node, `hostname slots=8` (default /job/hostfile, DeepSpeed's
#                own default). DeepSpeed trains on this node alone when the file is
#                missing, so the script stops instead.
#   MASTER_ADDR  where the other nodes reach rank 0 (default: the first host in HOSTFILE)
#   MASTER_PORT  its port (default 29500)
ds_multinode() {
    HOSTFILE=${HOSTFILE:-/job/hostfile}
    [ -f "$HOSTFILE" ] || { echo "hostfile not found: $HOSTFILE (set HOSTFILE)" >&2; exit 1; }
    MASTER_ADDR=${MASTER_ADDR:-$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")}
    mkdir -p "$OUTPUT"
    _ds_launch --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
        --master_port "${MASTER_PORT:-29500}" ++ "$@"
}

# slurm_hostfile: inside a SLURM job, write HOSTFILE=$OUTPUT/hostfile.$SLURM_JOB_ID, one
# `host slots=N` line per node of the job (N: SLURM_GPUS_ON_NODE, default 8), and set
# MASTER_ADDR to its first host. (Any HOSTFILE or MASTER_ADDR in the environment is ignored.)
slurm_hostfile() {
    mkdir -p "$OUTPUT"
    HOSTFILE=$OUTPUT/hostfile.$SLURM_JOB_ID
    local gpus=${SLURM_GPUS_ON_NODE:-8}
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$gpus/" >"$HOSTFILE"
    MASTER_ADDR=$(head -n 1 "$HOSTFILE" | cut -d" " -f1)
}

# ds_slurm ENTRY.py FLAGS... [-- EXTRA...]: inside a SLURM job, on all its nodes (slurm_hostfile);
# rank 0 runs on the first node, DeepSpeed reaches the others with pdsh over ssh.
# Preemption: the .sbatch files ask for SIGUSR1 two minutes before the time limit
# (--signal=B:USR1@120, to this script); the trap writes OUTPUT/STOP, which the ranks check at
# every step boundary: they save a checkpoint and exit 75, and the job requeues itself
# (--requeue); the requeued job runs with --resume.
ds_slurm() {
    slurm_hostfile
    trap 'touch "$OUTPUT/STOP"' USR1
    _ds_launch --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
        --master_port "${MASTER_PORT:-29500}" ++ "$@" &
    local pid=$! rc
    while true; do
        wait "$pid" && rc=0 || rc=$?
        kill -0 "$pid" 2>/dev/null || break   # still running: the trap interrupted `wait`
    done
    trap - USR1
    if [ "$rc" -eq 75 ]; then
        echo "preempted: checkpoint saved; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}

# _ds_launch LAUNCHER_FLAGS... ++ ENTRY.py FLAGS... [-- EXTRA...]
_ds_launch() {
    local launcher=() flags=()
    while [ $# -gt 0 ] && [ "$1" != ++ ]; do launcher+=("$1"); shift; done
    if [ $# -gt 0 ]; then shift; fi
    while [ $# -gt 0 ] && [ "$1" != -- ]; do flags+=("$1"); shift; done
    if [ $# -gt 0 ]; then shift; fi
    deepspeed "${launcher[@]}" "${flags[@]}" \
        --output_dir "$OUTPUT" --resume --enable_tensorboard \
        --save_steps "${SAVE_STEPS:-200}" --eval_steps "${EVAL_STEPS:-200}" "$@" \
        2>&1 | tee -a "$OUTPUT/training.log"
}
