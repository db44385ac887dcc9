"""Stage 3 trains in training mode and generates in eval mode.

transformers checkpoints activations only when a module is training; models come from
`from_pretrained` in eval mode, so a stage-3 update left in eval mode silently ignores
--gradient_checkpointing (at 7B, ~15 GB of activations per micro-batch instead of ~2).
One in-process PPO run (actor and critic both checkpointed) counts the checkpointed layer
calls in each phase. The same run covers the experiment settings of issue 13 end to end: the
oracle calculator's gold credit and a critic started from the policy (--critic_init policy).
"""
from __future__ import annotations

import pytest
import torch

import step3_rlhf.main as stage3
from tests.conftest import read_metrics


@pytest.fixture(scope="module")
def reward_folder(tiny_model, tmp_path_factory):
    """A reward model on a perturbed tiny backbone (a fresh head: this test reads no scores' meaning),
    so that a critic started from the policy is told apart from one copied from it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out = tmp_path_factory.mktemp("rm")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rm = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        rm.model.embed_tokens.weight.add_(0.01)
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def instrument(engine, calls: list, phase: list) -> int:
    """Record the phase of every checkpointed decoder-layer call of `engine`; the layer count."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in engine.module.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    assert layers, "--gradient_checkpointing did not reach the decoder layers"
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, _layer=layer, **kwargs):
            calls.append(phase[0])
            return _inner(*args, **kwargs)
        layer._gradient_checkpointing_func = counted
    return len(layers)


def test_updates_run_in_train_mode_with_checkpointing_and_rollouts_in_eval_mode(
        tiny_model, reward_folder, tmp_path, monkeypatch):
    calls: list[str] = []
    phase = ["other"]
    layers: list[int] = []
    critic_starts: list[bool] = []
    modes: list[tuple[str, bool]] = []
    build = stage3.build_models

    def build_instrumented(*args, **kwargs):
        m = build(*args, **kwargs)
        layers.extend(instrument(engine, calls, phase) for engine in (m.actor, m.critic))
        embed = lambda e: e.module.model.embed_tokens.weight  # noqa: E731
        critic_starts.append(torch.equal(embed(m.critic), embed(m.actor)))
        collect = m.rollout.collect

        def collect_in_phase(*a, **kw):
            phase[0] = "rollout"
            modes.append(("rollout", m.actor.module.training or m.critic.module.training))
            try:
                return collect(*a, **kw)
            finally:
                phase[0] = "other"
        m.rollout.collect = collect_in_phase
        return m

    monkeypatch.setattr(stage3, "build_models", build_instrumented)
    stage3.main([str(a) for a in ["--algo", "ppo", "--reward_calculator", "oracle",
                 "--actor_model_name_or_path", tiny_model, "--reward_model_name_or_path", reward_folder,
                 "--data_path", "imdb", "--data_output_path", tmp_path / "cache", "--output_dir", tmp_path / "out",
                 "--actor_zero_stage", "2", "--critic_zero_stage", "2", "--reference_zero_stage", "0",
                 "--reward_zero_stage", "0", "--gradient_checkpointing", "--critic_init", "policy",
                 "--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "2",
                 "--ppo_epochs", "1", "--max_prompt_seq_len", "8", "--max_answer_seq_len", "4",
                 "--max_steps", "2", "--save_steps", "0", "--eval_steps", "0", "--max_eval_samples", "4",
                 "--no-enable_tensorboard"]])
    assert critic_starts == [True], "--critic_init policy: the critic's trunk is not the policy's"
    assert modes and not any(training for _, training in modes), "a rollout ran with a model in train mode"
    assert "rollout" not in calls, "generation or scoring ran checkpointed (train mode): no KV cache"
    # every update forward checkpoints each layer once (the non-reentrant recomputation in
    # backward does not call it again): 2 steps x 2 micro-batches x (actor + critic layers)
    assert len(calls) == 2 * 2 * sum(layers), (len(calls), layers)
    # the oracle's dense rewards reached the update and kept sum_t r_t = R
    train = read_metrics(tmp_path / "out", "train")
    assert len(train) == 2
    for row in train:
        assert row["dense_reward_sum"] == pytest.approx(row["reward_score"], abs=1e-5)
        # throughput in the logs: the step's phases, samples/s and generated tokens/s
        assert all(row[f"time_{p}"] > 0 for p in ("generate", "forward", "scoring", "train")), row
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0
