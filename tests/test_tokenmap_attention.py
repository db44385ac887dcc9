"""Last-layer attention without eager mode, token maps between tokenizers, and the scorers.

ALGORITHMS.md section 1 (ABC): the reward model's last-layer, head-averaged attention
row of the last token, restricted to response tokens, is the credit; it must be fetched
without forcing every layer onto eager attention, and moved onto the policy's tokens
(any tokenizer) with its total preserved so that sum_t r_t = R stays exact.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from common.attention import LayerAttention
from common.data.batches import pad
from common.data.encode import prompt_ids
from common.errors import ConfigError
from common.heads import last_token_index, position_ids, sequence_scores, token_logits
from common.rewards import RewardInputs, compute_rewards
from common.tokenmap import char_spans, identity_map, overlap_map, same_tokenizer
from step3_rlhf.scoring import DiscriminatorScorer, RewardScorer

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
CORPUS = [
    "the movie was great and the actors were wonderful",
    "a terrible film, the plot was boring and too long",
    "I loved the music; the story was simple but moving",
    "what a waste of time. never again! Quite bad, really.",
    "Some scenes were funny, others just odd; 10 out of 10 for effort?",
]


# ---- tiny models and tokenizers ------------------------------------------------------
def llama_config(vocab=64, pad_token_id=0, **kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=pad_token_id, **kw)


def build(cls_name: str, seed: int = 0, **kw):
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(llama_config(**kw)).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def eager_copy(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert model.config._attn_implementation == "sdpa"   # the original is untouched
    return eager


@torch.no_grad()
def eager_last_layer(model, ids, mask, layer: int = -1) -> torch.Tensor:
    """Reference: (B, T, T) head-averaged attention of `layer` (the last) from output_attentions=True."""
    out = eager_copy(model)(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                            output_attentions=True, use_cache=False)
    return out.attentions[layer].float().mean(1)


class Engine:
    """What the scorers need from a DeepSpeed engine: `.module`, `.device`, and the model's attributes."""

    def __init__(self, model):
        self.module, self.device = model, model.device

    def __getattr__(self, name):
        return getattr(self.module, name)


def byte_bpe(vocab_size: int):
    """GPT-2-style byte-level BPE (lossless)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIALS)


def char_bpe(vocab_size: int):
    """Character BPE with no pre-tokenizer: merges cross spaces, so its pieces differ from byte_bpe's."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS.values()), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIALS)


@pytest.fixture(scope="module")
def policy_tok():
    return byte_bpe(300)


@pytest.fixture(scope="module")
def scorer_tok():
    return char_bpe(120)


# ---- LayerAttention --------------------------------------------------------------
SEQS = [[1, 5, 9, 13, 22, 31, 2], [1, 7, 2], [1, 4, 4, 40, 8, 11, 17, 50, 2], [1, 60, 3, 2]]


def queries_for(mask: torch.Tensor) -> torch.Tensor:
    """Per row: first, middle and last real positions, and the last again (Q = 4)."""
    qs = []
    for row in mask:
        real = torch.nonzero(row).flatten()
        qs.append([real[0], real[len(real) // 2], real[-1], real[-1]])
    return torch.tensor(qs)


@pytest.mark.parametrize("cls_name,kw", [("LlamaForSequenceClassification", {"num_labels": 1}),
                                         ("LlamaForCausalLM", {})])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("layer", [-1, 0])
def test_layer_rows_equal_eager_attention(cls_name, kw, side, layer):
    model = build(cls_name, **kw)
    ids, mask = pad(SEQS, 0, side=side)
    att = LayerAttention(model, layer)
    with torch.no_grad(), att.capture():
        assert model.config._attn_implementation == "sdpa"
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    queries = queries_for(mask)
    rows = att.rows(mask, queries)                                   # (B, Q, T)
    reference = eager_last_layer(model, ids, mask, layer)            # (B, T, T)
    expected = reference.gather(1, queries[:, :, None].expand(-1, -1, ids.shape[1]))
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-6)
    # each row is a distribution over the real, causal keys
    torch.testing.assert_close(rows.sum(-1), torch.ones(queries.shape))
    assert torch.all(rows[(mask == 0)[:, None, :].expand_as(rows)] == 0)


def test_a_layer_out_of_range_is_a_clear_error():
    model = build("LlamaForSequenceClassification", num_labels=1)
    with pytest.raises(ConfigError, match=r"--abc_attention_layer 3: .* has 3 attention layers \(0 to 2, or -1"):
        LayerAttention(model, 3)


def test_capture_keeps_every_layer_on_sdpa_and_changes_no_output(monkeypatch):
    import transformers.models.llama.modeling_llama as modeling_llama
    model = build("LlamaForSequenceClassification", num_labels=1)
    ids, mask = pad(SEQS, 0)
    with torch.no_grad():
        before = sequence_scores(model, ids, mask)
    calls = []
    interface = modeling_llama.ALL_ATTENTION_FUNCTIONS
    sdpa = interface["sdpa"]

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(interface, "sdpa", counting)
    att = LayerAttention(model)
    with torch.no_grad(), att.capture():
        during = sequence_scores(model, ids, mask)
    assert calls == [0, 1, 2]                      # all three layers, the last one included, ran sdpa
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert {"q", "k", "rope"} <= set(att.captured)
    # outside capture, nothing is recorded
    att.captured = {}
    with torch.no_grad():
        sequence_scores(model, ids, mask)
    assert att.captured == {}


# ---- token maps ----------------------------------------------------------------------
def test_overlap_map_shares_by_hand():
    src = [(0, 3), (3, 5), (5, 5), (5, 8)]
    dst = [(0, 2), (2, 5)]
    # (0,3): 2 chars in (0,2), 1 in (2,5) -> [2/3, 1/3]
    # (3,5): both chars in (2,5) -> [0, 1]
    # (5,5) empty (EOS) and (5,8) past the end: whole to the last target starting at or before 5
    m = overlap_map(src, dst)
    torch.testing.assert_close(m, torch.tensor([[2 / 3, 1 / 3], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(m.sum(1), torch.ones(4))


def test_overlap_map_skips_empty_targets_and_sends_eos_to_eos():
    src = [(0, 5), (5, 5)]
    dst = [(0, 2), (2, 2), (2, 5), (5, 5)]        # an empty special token in the middle, EOS at the end
    # (0,5): 2 chars to (0,2), 3 to (2,5) -> [0.4, 0, 0.6, 0]; EOS (5,5) -> last target starting <= 5: EOS
    m = overlap_map(src, dst)
    torch.testing.assert_close(m, torch.tensor([[0.4, 0.0, 0.6, 0.0], [0.0, 0.0, 0.0, 1.0]]))


def test_overlap_map_random_spans_rows_sum_to_one():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 30
        cuts_a = sorted(set(torch.randint(1, n, (6,), generator=g).tolist()) | {0, n})
        cuts_b = sorted(set(torch.randint(1, n, (9,), generator=g).tolist()) | {0, n})
        src = list(zip(cuts_a[:-1], cuts_a[1:])) + [(n, n)]
        dst = list(zip(cuts_b[:-1], cuts_b[1:]))
        m = overlap_map(src, dst)
        torch.testing.assert_close(m.sum(1), torch.ones(len(src)))
        # column j receives exactly its length in characters from the non-empty source tokens
        lengths = torch.tensor([float(b - a) for a, b in dst])
        src_len = torch.tensor([float(b - a) for a, b in src])
        torch.testing.assert_close(src_len @ m, lengths)


def test_identity_map_folds_extra_rows_onto_the_last_column():
    m = identity_map(5, 3)
    expected = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close(identity_map(3, 3), torch.eye(3))


@pytest.mark.parametrize("text", ["the movie was boring, the music wonderful",
                                  "Quite odd; 10 out of 10? never again!",
                                  "café naïve → 😀 ok"])
def test_char_spans_tile_the_decoded_text(policy_tok, text):
    ids = policy_tok(text, add_special_tokens=False)["input_ids"]
    full = [policy_tok.bos_token_id] + ids + [policy_tok.eos_token_id]
    spans = char_spans(policy_tok, full)
    decoded = policy_tok.decode(full, skip_special_tokens=True)
    assert decoded == text
    assert len(spans) == len(full)
    assert spans[0] == (0, 0) and spans[-1] == (len(text), len(text))    # BOS, EOS: empty
    assert all(a <= b for a, b in spans)
    assert all(spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1))   # contiguous
    if text.isascii():
        # every token's span is exactly its own text, and agrees with the fast offsets
        assert [text[a:b] for a, b in spans[1:-1]] == [policy_tok.decode([i]) for i in ids]
        offsets = policy_tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert spans[1:-1] == [tuple(o) for o in offsets]


def test_same_tokenizer(policy_tok, scorer_tok):
    assert same_tokenizer(policy_tok, policy_tok)
    assert same_tokenizer(policy_tok, byte_bpe(300))       # an equal copy
    assert not same_tokenizer(policy_tok, scorer_tok)


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
