"""The stage-3 scorers on tiny models: ABC's reward-model attention moved onto the policy's
tokens across tokenizers with its mass preserved (sum_t r_t = R stays exact, ALGORITHMS.md
section 1), and TLCR's discriminator in range and zero past each response.

The tiny models, tokenizers and the eager attention reference are test_tokenmap_attention's.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.data.batches import pad
from common.data.encode import prompt_ids
from common.heads import last_token_index, sequence_scores, token_logits
from common.rewards import RewardInputs, compute_rewards
from step3_rlhf.scoring import DiscriminatorScorer, RewardScorer
from tests.test_tokenmap_attention import (Engine, build, eager_last_layer, policy_tok,  # noqa: F401 (fixtures)
                                          scorer_tok)


# ---- RewardScorer: ABC across tokenizers ---------------------------------------------
PROMPTS = ["the movie", "a terrible", "I loved the", "what a"]
RESPONSES = [" was great and the actors were wonderful", " film, the plot was boring",
             " music; the story was simple but moving", " waste of time. never again!"]


def policy_rollout(tok, truncate: int = 3):
    """Policy prompts and responses as rollouts give them: EOS-terminated, except sample
    `truncate` which was cut off without EOS."""
    prompts = [prompt_ids(tok, p) for p in PROMPTS]
    responses = []
    for k, text in enumerate(RESPONSES):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        responses.append(ids[:-2] if k == truncate else ids + [tok.eos_token_id])
    width = max(map(len, responses))
    _, mask = pad(responses, tok.pad_token_id)   # the rollout's response mask (up to and incl. EOS)
    return prompts, responses, width, mask


def reward_engine(tok, seed=0):
    return Engine(build("LlamaForSequenceClassification", seed=seed, vocab=len(tok),
                        pad_token_id=tok.pad_token_id, num_labels=1))


def rm_reference(model, tok, policy_tok, responses):
    """Independently: the reward model's own ids, scores and last-row attention per token."""
    seqs, starts = [], []
    for p, resp in zip(PROMPTS, responses):
        prompt = prompt_ids(tok, p)
        text = policy_tok.decode(resp, skip_special_tokens=True)
        seqs.append(prompt + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        starts.append(len(prompt))
    ids, mask = pad(seqs, tok.pad_token_id)
    att = eager_last_layer(model, ids, mask)
    last = last_token_index(mask)
    rows = att[torch.arange(len(seqs)), last]                            # (B, T)
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
    return seqs, starts, rows, scores


def test_reward_scorer_across_tokenizers_preserves_attention_mass(policy_tok, scorer_tok):
    prompts, responses, width, mask = policy_rollout(policy_tok)
    engine = reward_engine(scorer_tok)
    scorer = RewardScorer(engine, scorer_tok, policy_tok, "raw", want_attention=True)
    assert not scorer.same
    scores, att = scorer(PROMPTS, prompts, responses, width)
    assert att.shape == (len(PROMPTS), width)

    seqs, starts, rows, ref_scores = rm_reference(engine.module, scorer_tok, policy_tok, responses)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    for b, resp in enumerate(responses):
        # the scorer tokenised differently (the test would prove nothing otherwise)
        assert len(seqs[b]) - starts[b] != len(resp) or seqs[b][starts[b]:] != resp
        own_mass = rows[b, starts[b]:len(seqs[b])].sum()               # RM's response tokens incl. its EOS
        torch.testing.assert_close(att[b].sum(), own_mass, rtol=1e-5, atol=1e-6)
        assert torch.all(att[b, len(resp):] == 0)                       # nothing past the response
        assert torch.all(att[b, :len(resp)] >= 0)

    cfg = SimpleNamespace(reward_calculator="abc", abc_beta=0.8, tlcr_add_sequence_reward=False,
                          composite_weights="")
    r = compute_rewards(RewardInputs(mask=mask, scores=scores, rm_attention=att), cfg)
    torch.testing.assert_close(r.sum(-1), scores, rtol=0, atol=1e-5)
    assert torch.all(r[mask == 0] == 0)


def test_reward_scorer_across_tokenizers_moves_attention_by_characters(policy_tok, scorer_tok):
    """Per token: spread each RM token's attention evenly over its characters (its EOS onto the
    policy's last token) and add up the characters of each policy token."""
    prompts, responses, width, _ = policy_rollout(policy_tok)
    engine = reward_engine(scorer_tok, seed=1)
    _, att = RewardScorer(engine, scorer_tok, policy_tok, "raw", want_attention=True)(
        PROMPTS, prompts, responses, width)
    _, starts, rows, _ = rm_reference(engine.module, scorer_tok, policy_tok, responses)
    for b, resp in enumerate(responses):
        text = policy_tok.decode(resp, skip_special_tokens=True)
        per_char = torch.zeros(len(text))
        enc = scorer_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        for k, (a, e) in enumerate(enc["offset_mapping"]):
            per_char[a:e] += rows[b, starts[b] + k] / (e - a)
        expected = torch.zeros(width)
        pos = 0
        for j, tid in enumerate(resp):                                  # ASCII text: tokens decode alone
            piece = policy_tok.decode([tid], skip_special_tokens=True)
            expected[j] = per_char[pos:pos + len(piece)].sum()
            pos += len(piece)
        eos_attention = rows[b, starts[b] + len(enc["input_ids"])]
        expected[len(resp) - 1] += eos_attention                       # the RM's EOS -> policy EOS / last token
        torch.testing.assert_close(att[b], expected, rtol=1e-5, atol=1e-6)


def test_reward_scorer_same_tokenizer_uses_policy_ids_and_direct_attention(policy_tok):
    prompts, responses, width, r_mask = policy_rollout(policy_tok)
    engine = reward_engine(policy_tok)
    scorer = RewardScorer(engine, policy_tok, policy_tok, "raw", want_attention=True)
    assert scorer.same
    inp = scorer.inputs(PROMPTS, prompts, responses)
    eos = policy_tok.eos_token_id
    for b, resp in enumerate(responses):
        body = resp if resp[-1] == eos else resp + [eos]                # the truncated one gets an EOS
        assert inp.ids[b] == prompts[b] + body
        assert inp.starts[b] == len(prompts[b])
    scores, att = scorer(PROMPTS, prompts, responses, width)

    ids, mask = pad(inp.ids, policy_tok.pad_token_id)
    reference = eager_last_layer(engine.module, ids, mask)
    last = last_token_index(mask)
    with torch.no_grad():
        torch.testing.assert_close(scores, sequence_scores(engine.module, ids, mask), rtol=1e-5, atol=1e-5)
    for b, resp in enumerate(responses):
        row = reference[b, last[b]]
        s, n = inp.starts[b], len(resp)
        expected = torch.zeros(width)
        expected[:n] = row[s:s + n]
        if resp[-1] != eos:
            expected[n - 1] += row[s + n]                                # the appended EOS folds onto the last
        torch.testing.assert_close(att[b], expected, rtol=1e-5, atol=1e-6)
    cfg = SimpleNamespace(reward_calculator="abc", abc_beta=0.8, tlcr_add_sequence_reward=False,
                          composite_weights="")
    r = compute_rewards(RewardInputs(mask=r_mask, scores=scores, rm_attention=att), cfg)
    torch.testing.assert_close(r.sum(-1), scores, rtol=0, atol=1e-5)


def test_reward_scorer_without_attention_returns_scores_only(policy_tok, scorer_tok):
    prompts, responses, width, _ = policy_rollout(policy_tok)
    engine = reward_engine(scorer_tok)
    scores, att = RewardScorer(engine, scorer_tok, policy_tok, "raw", want_attention=False)(
        PROMPTS, prompts, responses, width)
    assert att is None
    _, _, _, ref_scores = rm_reference(engine.module, scorer_tok, policy_tok, responses)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


# ---- DiscriminatorScorer -------------------------------------------------------------
@pytest.mark.parametrize("same", [True, False])
def test_discriminator_scorer_in_range_and_zero_past_each_response(policy_tok, scorer_tok, same):
    tok = policy_tok if same else scorer_tok
    prompts, responses, width, _ = policy_rollout(policy_tok)
    engine = Engine(build("LlamaForTokenClassification", seed=2, vocab=len(tok),
                          pad_token_id=tok.pad_token_id, num_labels=2))
    with torch.no_grad():                     # a random head is too gentle: sharpen it to reach the range ends
        engine.module.score.weight.mul_(50)
    scorer = DiscriminatorScorer(engine, tok, policy_tok, "raw")
    out = scorer(PROMPTS, prompts, responses, width)
    assert out.shape == (len(PROMPTS), width)
    assert out.min() >= -1 and out.max() <= 1
    assert out.abs().max() > 0.5
    for b, resp in enumerate(responses):
        assert torch.all(out[b, len(resp):] == 0)
        assert torch.all(out[b, :len(resp)] != 0)
    if same:  # identical tokenizers: each policy token gets its own 2p - 1
        inp = scorer.inputs(PROMPTS, prompts, responses)
        ids, mask = pad(inp.ids, tok.pad_token_id)
        with torch.no_grad():
            p = torch.softmax(token_logits(engine.module, ids, mask), -1)[..., 1]
        for b, resp in enumerate(responses):
            s, n = inp.starts[b], len(resp)
            expected = 2 * p[b, s:s + n] - 1
            if resp[-1] != tok.eos_token_id:   # the appended EOS shares the last token (mean of the two)
                expected[-1] = (expected[-1] + 2 * p[b, s + n] - 1) / 2
            torch.testing.assert_close(out[b, :n], expected, rtol=1e-5, atol=1e-6)
