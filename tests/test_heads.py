"""Reward heads: where the score is read, and the losses, on hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch

from common.data.batches import pad
from common.heads import (bradley_terry, last_token_index, sequence_scores, soft_target_loss,
                          token_logits, token_rewards)
from common.token_labels import IGNORE, NEGATIVE, NEUTRAL, POSITIVE


def tiny_config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=kw.pop("pad_token_id", 0), eos_token_id=2, **kw)


@pytest.fixture(scope="module")
def reward_model():
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_config(num_labels=1)).eval()


SEQS = [[1, 5, 9, 13, 2], [1, 7, 2], [1, 4, 4, 4, 8, 11, 17, 2]]


def scores_of(model, seqs, side, pad_id=0):
    ids, mask = pad(seqs, pad_id, side=side)
    with torch.no_grad():
        return sequence_scores(model, ids, mask)


def test_last_token_index_left_and_right():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_score_is_independent_of_padding_side_and_batch(reward_model):
    alone = torch.stack([scores_of(reward_model, [s], "right")[0] for s in SEQS])
    right = scores_of(reward_model, SEQS, "right")
    left = scores_of(reward_model, SEQS, "left")
    padded_more = scores_of(reward_model, SEQS + [[1] * 30], "left")[:3]
    for other in (right, left, padded_more):
        torch.testing.assert_close(other, alone, rtol=1e-5, atol=1e-5)


def test_pad_equal_to_eos_still_reads_the_eos_position(reward_model):
    """Llama's tokenizer has no pad token; densehf pads with EOS and reads by the mask."""
    right = scores_of(reward_model, SEQS, "right", pad_id=2)   # 2 is also EOS, ending each seq
    alone = torch.stack([scores_of(reward_model, [s], "right", pad_id=2)[0] for s in SEQS])
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    # reading by pad id (what a naive implementation does) would land elsewhere
    ids, mask = pad(SEQS, 2)
    naive = (torch.arange(ids.shape[1]) * (ids != 2)).argmax(-1)
    assert not torch.equal(naive, last_token_index(mask))


def test_matches_transformers_own_reading_when_pad_is_distinct(reward_model):
    ids, mask = pad(SEQS, 0)
    with torch.no_grad():
        hf = reward_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(hf, scores_of(reward_model, SEQS, "right"), rtol=1e-5, atol=1e-5)


def test_a_lora_reward_model_is_read_through_its_adapters():
    """--lora_dim on stage 2: the score comes from the backbone under PEFT's wrapper, adapters and head in
    the graph (reading the wrapper's `.model` gave the whole classifier back)."""
    from transformers import LlamaForSequenceClassification

    from common.lora import apply_lora
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(num_labels=1)).eval()
    plain = scores_of(model, SEQS, "right")
    wrapped = apply_lora(model, 4, "layers.1.mlp.down_proj", 16.0)
    torch.testing.assert_close(scores_of(wrapped, SEQS, "right"), plain)  # LoRA's B starts at 0
    ids, mask = pad(SEQS, 0)
    sequence_scores(wrapped, ids, mask).sum().backward()
    trained = {n for n, p in wrapped.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("layers.1.mlp.down_proj.lora_B" in n for n in trained) and any("score" in n for n in trained)
    assert not any("layers.0." in n for n in trained), trained  # only the adapters asked for


def test_bradley_terry_values():
    loss = bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-2.0)), math.log(2.0)]))


def test_soft_target_loss_by_hand():
    # one sequence: a positive token, a negative token, a neutral token, one ignored
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.5, 0.5], [9.0, -9.0]]])
    labels = torch.tensor([[POSITIVE, NEGATIVE, NEUTRAL, IGNORE]])
    logp = torch.log_softmax(logits, -1)[0]
    expected = (-logp[0, 1] - logp[1, 0] - 0.5 * (logp[2, 0] + logp[2, 1])) / 3
    torch.testing.assert_close(soft_target_loss(logits, labels), expected)


def test_soft_target_loss_is_per_sequence_mean_then_batch_mean():
    logits = torch.zeros(2, 3, 2)
    logits[0, 0] = torch.tensor([0.0, 3.0])
    labels = torch.tensor([[POSITIVE, IGNORE, IGNORE], [NEGATIVE, NEGATIVE, NEGATIVE]])
    first = -torch.log_softmax(torch.tensor([0.0, 3.0]), -1)[1]
    torch.testing.assert_close(soft_target_loss(logits, labels), (first + math.log(2.0)) / 2)


def test_token_reward_is_one_softmax_in_minus_one_one():
    logits = torch.tensor([[[10.0, -10.0], [0.0, 0.0], [-10.0, 10.0]]])
    r = token_rewards(logits)
    torch.testing.assert_close(r, torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6, rtol=0)


def test_token_head_is_bias_free_and_reads_every_position():
    from transformers import LlamaForTokenClassification
    model = LlamaForTokenClassification(tiny_config(num_labels=2, token_classification_bias=False))
    assert model.score.bias is None
    ids, mask = pad(SEQS, 0)
    assert token_logits(model, ids, mask).shape == (3, ids.shape[1], 2)
