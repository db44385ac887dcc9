"""Layer attention without eager mode and token maps between tokenizers (the scorers that use
them: test_scorers.py).

ALGORITHMS.md section 1 (ABC): the reward model's last-layer, head-averaged attention
row of the last token, restricted to response tokens, is the credit; it must be fetched
without forcing every layer onto eager attention, and moved onto the policy's tokens
(any tokenizer) with its total preserved so that sum_t r_t = R stays exact.
"""
from __future__ import annotations

import copy

import pytest
import torch

from common.attention import LayerAttention
from common.data.batches import pad
from common.errors import ConfigError
from common.heads import position_ids, sequence_scores
from common.tokenmap import char_spans, identity_map, overlap_map, same_tokenizer

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
