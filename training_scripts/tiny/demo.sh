#!/usr/bin/env bash
# The main job (`make demo`): all three stages on the embedded IMDb task, tiny preset, CPU.
# SFT -> reward model + TLCR discriminator -> ReMax with ABC dense rewards; prints the
# held-out gold reward before and after RL. Re-running resumes (finished stages just re-export).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
HERE=training_scripts/tiny
ROOT=${DEMO_OUTPUT:-output/tiny}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

python data/build_imdb.py   # the embedded task: data, gold scorer, tokenizer, tiny model (~30 s, cached)

OUTPUT=$ROOT/sft MAX_STEPS=${SFT_STEPS:-200} bash $HERE/step1_sft.sh --resume
SFT_MODEL=$ROOT/sft OUTPUT=$ROOT/rm MAX_STEPS=${RM_STEPS:-160} bash $HERE/step2_reward_model.sh --resume
SFT_MODEL=$ROOT/sft OUTPUT=$ROOT/disc MAX_STEPS=${DISC_STEPS:-120} bash $HERE/step2_discriminator.sh --resume
SFT_MODEL=$ROOT/sft REWARD_MODEL=$ROOT/rm DISC_MODEL=$ROOT/disc ALGO=remax CALCULATOR=abc \
    OUTPUT=$ROOT/remax_abc MAX_STEPS=${RL_STEPS:-60} bash $HERE/step3_rlhf.sh --resume

python - "$ROOT" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
sft, rm, disc, rl = (json.loads((root / d / "summary.json").read_text()) for d in ("sft", "rm", "disc", "remax_abc"))
print("\n== densehf demo: embedded IMDb task, tiny preset, 2 CPU processes ==")
print(f"stage 1 SFT             eval perplexity {sft['final_eval']['perplexity']:.1f}")
print(f"stage 2 reward model    eval accuracy   {rm['final_eval']['accuracy']:.3f}")
print(f"stage 2 discriminator   edited-token accuracy {disc['final_eval']['edited_accuracy']:.3f}")
before, after = rl["initial_eval"], rl["final_eval"]
print(f"stage 3 ReMax + ABC     held-out gold reward {before['gold_reward']:+.3f} -> {after['gold_reward']:+.3f}"
      f" | reward-model score {before['reward_score']:+.3f} -> {after['reward_score']:+.3f}"
      f" | KL {after['kl']:.3f}")
print(f"policy export: {rl['export']}  (TensorBoard: tensorboard --logdir {root})")
PY
