"""Stage 3's length flags reach `generate`: a policy that always wants EOS still writes
--min_answer_seq_len tokens first, sampled and greedy alike."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.config import RLHFConfig
from common.data.batches import pad
from common.data.encode import prompt_ids
from common.models import load_tokenizer
from common.strategy import DeepSpeedStrategy
from step3_rlhf.rollout import RolloutEngine, response_mask


@pytest.mark.parametrize("min_len", [0, 5])
@pytest.mark.parametrize("greedy", [False, True])
def test_min_answer_seq_len_holds_back_eos(tiny_model, min_len, greedy):
    from transformers import AutoModelForCausalLM
    cfg = RLHFConfig(max_answer_seq_len=8, min_answer_seq_len=min_len)
    tok = load_tokenizer(cfg, tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    def eos_first(module, inputs, logits):
        logits = logits.clone()
        logits[..., tok.eos_token_id] += 1e4
        return logits
    model.lm_head.register_forward_hook(eos_first)
    engine = RolloutEngine.__new__(RolloutEngine)  # only what `generate` reads; ZeRO-0 has no shards
    engine.cfg, engine.tokenizer, engine.strategy = cfg, tok, DeepSpeedStrategy(cfg)
    engine.actor = SimpleNamespace(module=model, device=torch.device("cpu"))
    ids, mask = pad([prompt_ids(tok, p) for p in ("A great film", "I hated every minute of")],
                    tok.pad_token_id, side="left")
    torch.manual_seed(0)
    with torch.no_grad():
        seq = engine.generate(ids, mask, greedy=greedy)
    lengths = response_mask(seq[:, ids.shape[1]:], tok.eos_token_id).sum(-1)
    assert lengths.tolist() == [min_len + 1] * 2  # min_len tokens, then the EOS the policy wanted
