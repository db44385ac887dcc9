"""VPL through the deepspeed launcher, 2 CPU ranks: every variant, export/reload, resume, stage 3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import kill_and_resume, launch, read_metrics

pytestmark = pytest.mark.slow

# vae learns the users (300 steps of 2 x 16 pairs); base tunes its target backbone with LoRA
RUNS = {"vae": (2, 300, []), "base": (2, 20, ["--vpl_target_embeddings", "lora", "--lora_dim", 4]),
        "mean_and_variance": (3, 20, []), "categorical": (2, 20, ["--save_steps", 4])}  # kept: 16, 20
SEED = 1234  # the default --seed: the pets data folder is built with it


def vpl_args(variant: str, out: Path, cache: Path, zero: int, steps: int, *extra) -> list:
    return ["--model_type", "vpl", "--vpl_variant", variant, "--model_name_or_path", "tiny",
            "--data_path", "pets", "--output_dir", out, "--data_output_path", cache, "--zero_stage", zero,
            "--max_steps", steps, "--num_train_epochs", 20, "--per_device_train_batch_size", 16,
            "--max_seq_len", 64, "--learning_rate", 1e-3, "--log_steps", 10, "--no-enable_tensorboard", *extra]


@pytest.fixture(scope="module")
def vpl_runs(tiny_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vpl")
    out = {}
    for variant, (zero, steps, extra) in RUNS.items():
        out[variant] = root / variant
        launch("step2_reward/main.py", vpl_args(variant, out[variant], root / "cache", zero, steps, *extra))
    return out


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("variant", list(RUNS))
def test_every_variant_trains_on_two_ranks(vpl_runs, variant):
    s = summary(vpl_runs[variant])
    assert s["processes"] == 2 and s["steps"] == RUNS[variant][1] and s["zero_stage"] == RUNS[variant][0]
    final = s["final_eval"]
    for key in ("accuracy", "accuracy_controversial", "accuracy_agreed", "accuracy_user_quiet",
                "accuracy_user_playful"):
        assert 0.0 <= final[key] <= 1.0, (key, final)
    export = vpl_runs[variant] / "hf_export"
    assert json.loads((export / "densehf_stage.json").read_text())["kind"] == "vpl"
    assert (export / "model.safetensors").is_file() and (export / "vpl_head.safetensors").is_file()
    assert all(("kl" in r) == (variant == "vae") for r in read_metrics(vpl_runs[variant], "train"))


def test_vae_learns_each_user_through_deepspeed(vpl_runs):
    final = summary(vpl_runs["vae"])["final_eval"]
    assert final["accuracy_controversial"] > 0.85 and final["accuracy_agreed"] > 0.9, final


def export_accuracy(export: Path) -> float:
    """Eval accuracy recomputed from the export alone (as the run evaluated: same rows, contexts)."""
    from transformers import AutoModel, AutoTokenizer

    from common.data.loaders import read_file
    from common.data.schemas import PERSONAL
    from common.embeddings import embed_sequences
    from common.strategy import DeepSpeedStrategy
    from common.tasks.personal import resolve_personal_spec
    from common.vpl import context_backbone_path, load_head
    from step2_reward.vpl_data import collate, encode_personal, fixed_contexts, index_examples
    head, tok = load_head(export), AutoTokenizer.from_pretrained(export)
    folder = Path(resolve_personal_spec("pets", SEED))
    rows = {s: [encode_personal(tok, r, head.cfg.extra["max_seq_len"], "raw", "truncate")
                for r in read_file(folder / f"{s}.jsonl", PERSONAL)] for s in ("train", "eval")}
    data = index_examples(rows["train"], rows["eval"], str(folder))
    strategy = DeepSpeedStrategy(type("Cfg", (), {"seed": 0})())
    contexts, targets = (embed_sequences(strategy, AutoModel.from_pretrained(p).eval(), data.seqs, tok.pad_token_id, 64)
                         for p in (context_backbone_path(str(export)), str(export)))
    b = collate(data, head.cfg.extra["context_size"], contexts, tok.pad_token_id, True)(
        fixed_contexts(data, data.eval, head.cfg.extra["context_size"], SEED))
    eval_targets = targets[torch.tensor([e["c"] for e in data.eval] + [e["r"] for e in data.eval])]
    with torch.no_grad():
        chosen, rejected = head(eval_targets, b["context"], b["context_mask"])[0].chunk(2)
    return (head.scores(chosen) > head.scores(rejected)).float().mean().item()


@pytest.mark.parametrize("variant", ["vae", "base", "mean_and_variance"])
def test_export_reloads_with_the_runs_scores(vpl_runs, variant):
    """vae: frozen targets; base: LoRA merged into the exported backbone; mean_and_variance: ZeRO-3."""
    n_eval = 200
    expected = summary(vpl_runs[variant])["final_eval"]["accuracy"]
    assert export_accuracy(vpl_runs[variant] / "hf_export") == pytest.approx(expected, abs=1.01 / n_eval)


def test_resume_after_kill_matches_uninterrupted(vpl_runs, tmp_path):
    """Resumed from the uninterrupted categorical run's step 16, killed after step 18, resumed from 16
    again: the head that run exported (contexts are drawn from the checkpointed RNG, so the redone
    steps see the same ones)."""
    from safetensors.torch import load_file
    zero, steps, extra = RUNS["categorical"]
    reference = vpl_runs["categorical"]
    kill_and_resume("step2_reward/main.py", vpl_args("categorical", tmp_path / "killed", reference.parent / "cache",
                                                     zero, steps, *extra), kill_at=18, start_from=(reference, 16))
    heads = [load_file(str(run / "hf_export" / "vpl_head.safetensors")) for run in (tmp_path / "killed", reference)]
    assert heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_personalised_reward_follows_the_user(vpl_runs):
    """Stage 3's scorer: each user's z ranks their favourite animals' answers first."""
    from transformers import AutoModel, AutoTokenizer

    from common.data.encode import prompt_ids
    from common.strategy import DeepSpeedStrategy
    from common.tasks.personal import resolve_personal_spec
    from common.vpl import load_head, read_context
    from step3_rlhf.scoring import VPLScorer
    export = vpl_runs["vae"] / "hf_export"
    tok, model = AutoTokenizer.from_pretrained(export), AutoModel.from_pretrained(export).eval()
    context_file = str(Path(resolve_personal_spec("pets", SEED)) / "train.jsonl")
    prompt = "Which pet should I get?"
    answers = {a: f"I would recommend {a}: they are good company." for a in ("cats", "birds", "dogs", "rabbits")}
    ids = prompt_ids(tok, prompt)
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in answers.values()]
    strategy = DeepSpeedStrategy(type("Cfg", (), {"seed": 0})())
    contexts = {user: read_context(context_file, user)[:8] for user in ("quiet", "playful")}
    scores = {}
    for user, context in contexts.items():
        scorer = VPLScorer(model, load_head(export), tok, tok, "raw")
        scorer.set_users(strategy, model, context)
        scores[user] = dict(zip(answers, scorer([prompt] * 4, [ids] * 4, responses, 1)[0].tolist()))
    q, p = scores["quiet"], scores["playful"]
    assert min(q["cats"], q["birds"]) > max(q["dogs"], q["rabbits"]), scores
    assert min(p["dogs"], p["rabbits"]) > max(p["cats"], p["birds"]), scores
    # one scorer, each prompt naming its user (contexts of different sizes, padded together);
    # a prompt naming none gets the default user's z
    scorer = VPLScorer(model, load_head(export), tok, tok, "raw")
    scorer.set_users(strategy, model, contexts["quiet"], {"quiet": contexts["quiet"], "playful": contexts["playful"][:5]})
    five = VPLScorer(model, load_head(export), tok, tok, "raw")
    five.set_users(strategy, model, contexts["playful"][:5])
    users = ["quiet", "playful", None, "playful"]
    mixed = scorer([prompt] * 4, [ids] * 4, responses, 1, users=users)[0]
    alone = {"quiet": scores["quiet"], None: scores["quiet"],
             "playful": dict(zip(answers, five([prompt] * 4, [ids] * 4, responses, 1)[0].tolist()))}
    torch.testing.assert_close(mixed, torch.tensor([alone[u][a] for u, a in zip(users, answers)]))


def test_stage3_remax_with_a_vpl_reward(sft_runs, vpl_runs, tmp_path):
    """Prompts naming their user (and some naming none: --vpl_user's) on the Pets questions."""
    from common.tasks.personal import resolve_personal_spec
    pets = Path(resolve_personal_spec("pets", SEED))
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in (pets / "eval.jsonl").read_text().splitlines()][:48]
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], **({"user": r["user"]} if i % 3 else {})}) + "\n"
                               for i, r in enumerate(rows)))
    out = tmp_path / "remax_vpl"
    proc = launch("step3_rlhf/main.py", [
        "--algo", "remax", "--reward_calculator", "sparse", "--reward_dropout", "random",
        "--reward_dropout_rate", "0.5", "--actor_model_name_or_path", sft_runs[1][2],
        "--reward_model_type", "vpl", "--reward_model_name_or_path", vpl_runs["vae"],
        "--vpl_context_path", pets / "train.jsonl", "--vpl_user", "quiet",
        "--data_path", prompts, "--data_output_path", tmp_path / "cache", "--output_dir", out,
        "--actor_zero_stage", 2, "--reference_zero_stage", 0, "--reward_zero_stage", 3,
        "--per_device_generation_batch_size", 4, "--per_device_training_batch_size", 4,
        "--max_prompt_seq_len", 12, "--max_answer_seq_len", 8, "--max_steps", 3,
        "--max_eval_samples", 16, "--log_steps", 1, "--no-enable_tensorboard"])
    s = summary(out)
    assert s["steps"] == 3 and s["processes"] == 2
    assert "VPL reward: the z of 'quiet' for prompts naming no user; per-prompt users: playful, quiet" in proc.stderr + proc.stdout
    assert all(torch.isfinite(torch.tensor(r["reward_score"])) for r in read_metrics(out, "train"))
