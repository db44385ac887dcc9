"""Experiment presets: one budget per machine class, shared by every run of a grid.

Every stage runs as one plain process (no launcher): on 2 CPU cores the launcher's start-up
would cost more than a tiny run, and one GPU needs no launcher either.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    model: str                  # stage-1 start (a common/presets.py name)
    seeds: int
    steps: int                  # stage-3 optimizer steps per run
    eval_steps: int
    answer_len: int             # stage-3 --max_answer_seq_len (main grid and dropout sweep)
    long_answer_len: int        # the long-answer setting
    sft: tuple                  # stage-1 flags
    reward: tuple               # stage-2 flags shared by the reward model and the discriminator
    reward_model: tuple         # stage-2 --model_type sequence only
    discriminator: tuple        # stage-2 --model_type token only
    stage3: tuple               # stage-3 flags shared by every run
    note: str                   # what the README says about the budget
    min_answer_len: int = 0     # stage-3 --min_answer_seq_len (main grid and dropout sweep)
    long_min_answer_len: int = 0


# The ABC paper's IMDb PPO (TRL 0.7): 4 epochs over each rollout, top_p 1.0 (top_k is always 0),
# adaptive KL from 0.2 towards 6 nats, and a fresh value head on the policy's trunk
# (--critic_init policy) instead of a critic copied from the reward model, which is calibrated to
# sparse returns. Its mini-batch of 1 (64 updates per rollout of 16) is the smollm2 preset's; tiny
# takes 4 (16 updates) to fit the CPU budget. ReMax takes the same top_p and initial KL
# coefficient and ignores the rest.
PAPER_PPO = ("--ppo_epochs", 4, "--top_p", 1.0, "--adaptive_kl", "--kl_ctl", 0.2, "--kl_target", 6.0,
             "--critic_init", "policy")

PRESETS = {
    # the demo's recipe (training_scripts/tiny/*.sh) as one process, 16 sequences per step as the
    # demo's 2 x 8, trained about one epoch (measured 2026-12-06, see README): stage 1 for 1200 steps
    # (held-out perplexity 225; the demo's 200 steps leave 546 and a policy of entropy 6.4 nats per
    # token, on which 40 PPO steps gained a third as much gold reward); the reward model for 600
    # (587, one epoch: accuracy 0.91, against 0.75 at 160 steps). Stage 3: 80 steps of 16 prompts
    # (at 40 sparse was still rising), the paper's PPO settings
    "tiny": Preset(
        model="tiny", seeds=3, steps=80, eval_steps=4, answer_len=15, long_answer_len=48,
        sft=("--per_device_train_batch_size", 16, "--max_seq_len", 96, "--learning_rate", 1e-3,
             "--num_warmup_steps", 20, "--max_steps", 1200, "--max_eval_samples", 128),
        reward=("--per_device_train_batch_size", 16, "--max_seq_len", 96, "--learning_rate", 5e-4,
                "--num_warmup_steps", 10, "--max_eval_samples", 128),
        reward_model=("--max_steps", 600), discriminator=("--max_steps", 120),
        stage3=("--actor_zero_stage", 0, "--critic_zero_stage", 0, "--reference_zero_stage", 0,
                "--reward_zero_stage", 0, "--per_device_generation_batch_size", 16,
                "--per_device_training_batch_size", 4, "--max_prompt_seq_len", 16,
                "--actor_learning_rate", 5e-5, "--critic_learning_rate", 5e-5, *PAPER_PPO,
                "--abc_beta", 0.8, "--max_eval_samples", 64),
        note="2 CPU cores, fp32, one process per stage; answers up to 15 new tokens (long "
             "setting: 48, not 150, which would take ~10x longer per step on CPU)"),
    # the ABC paper's IMDb setting on one GPU: batch 16, 8-15 new tokens, beta 0.8, ~150 steps, its PPO
    "smollm2": Preset(
        model="smollm2", seeds=5, steps=150, eval_steps=10, answer_len=15, long_answer_len=160,
        min_answer_len=8, long_min_answer_len=140,
        sft=("--per_device_train_batch_size", 16, "--max_seq_len", 128, "--learning_rate", 2e-5,
             "--num_warmup_steps", 20, "--max_steps", 300),
        reward=("--per_device_train_batch_size", 16, "--max_seq_len", 128, "--learning_rate", 1e-5,
                "--num_warmup_steps", 20),
        reward_model=("--max_steps", 300), discriminator=("--max_steps", 200),
        stage3=("--actor_zero_stage", 0, "--critic_zero_stage", 0, "--reference_zero_stage", 0,
                "--reward_zero_stage", 0, "--per_device_generation_batch_size", 16,
                "--per_device_training_batch_size", 1, "--max_prompt_seq_len", 32,
                "--actor_learning_rate", 1.41e-5, "--critic_learning_rate", 1.41e-5, *PAPER_PPO,
                "--abc_beta", 0.8, "--max_eval_samples", 256),
        note="one GPU, fp32, one process per stage; answers of 8-15 new tokens (long setting: 140-160)"),
}


# Reward models a grid can build instead of its preset's (--reward_recipe), each under its own folder.
# smollm2_lora: SmolLM2-135M-Instruct (a pretrained model of another family, as the ABC paper's reward
# was; stage 3 reads it through the token map) with a fresh score head and LoRA on its last layer's MLP
# only, so the attention ABC reads (the last layer's, which runs before that MLP) stays the pretrained
# one. Measured 2026-12-07 (150 steps, 6.5 min on 2 cores): held-out accuracy 0.74, and its attention
# passes the diagnostics at 15 tokens (rank correlation with occlusion +0.27) where every fully
# fine-tuned reward model here failed (+0.06 to +0.09).
REWARD_RECIPES = {
    "smollm2_lora": ("--model_name_or_path", "smollm2", "--zero_stage", 0, "--per_device_train_batch_size", 16,
                     "--max_seq_len", 96, "--learning_rate", 1e-3, "--num_warmup_steps", 10,
                     "--max_eval_samples", 128, "--max_steps", 150, "--lora_dim", 16, "--lora_module_name",
                     "layers.29.mlp.gate_proj,layers.29.mlp.up_proj,layers.29.mlp.down_proj"),
}
