"""ABC-D on a real model: the rollout engine's policy-attention credit is the published recipe
(common.rewards.generator_attention_credit) applied to the eager last-layer attention."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.test_tokenmap_attention import Engine, build, eager_last_layer


def test_rollout_abc_d_credit_is_the_recipe_on_eager_attention():
    """The rollout's ABC-D credit on a real model: the generating steps' eager last-layer rows
    over the response keys, shifted by one and averaged (common.rewards.generator_attention_credit)."""
    from common.rewards import generator_attention_credit
    from common.heads import response_logprobs
    from step3_rlhf.rollout import RolloutEngine
    model = build("LlamaForCausalLM")
    prompts, width = [[1, 5, 9], [0, 1, 7]], 3                       # left-padded prompts
    response = torch.tensor([[13, 22, 31, 2, 2], [40, 8, 2, 2, 2]])   # EOS = 2, then padding
    r_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    seq = torch.cat([torch.tensor(prompts), response], 1)
    mask = torch.cat([torch.tensor([[1, 1, 1], [0, 1, 1]]), r_mask], 1)
    engine = RolloutEngine(SimpleNamespace(), None, None, Engine(model), None, None,
                           needs=frozenset({"policy_attention"}))
    with torch.no_grad(), engine.actor_attention.capture():
        response_logprobs(model, seq, mask, 5)
    credit = engine._policy_attention(mask, r_mask, width)
    eager = eager_last_layer(model, seq, mask)                        # (B, T, T)
    steps = eager[:, width - 1:width - 1 + 5, width:]                 # step j's row over the response keys
    torch.testing.assert_close(credit, generator_attention_credit(steps, r_mask), rtol=1e-5, atol=1e-7)
    assert torch.all(credit[:, 0] == 0) and torch.all(credit[r_mask == 0] == 0)
    assert torch.all(credit[0, 1:4] > 0) and torch.all(credit[1, 1:3] > 0)   # the last token gets credit too
