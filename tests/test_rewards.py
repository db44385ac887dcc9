"""Per-token reward calculators (common/rewards.py) and the response mask they rely on.

ALGORITHMS.md section 1: every calculator returns (B, T) rewards, zero on padding; the
invariants are sum_t r_t = R (sparse, uniform, abc, abc_d), r_t in [-1, 1] (tlcr) and
linearity (composite).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common import rewards as R
from common.errors import ConfigError
from common.rewards import (RewardInputs, at_last, composite_parts, compute_rewards, get_calculator,
                            needs_of, normalised, register)
from step3_rlhf.rollout import response_mask

EOS, PAD = 2, 0

# Right-padded responses of a batch of 4 (width 5):
RESPONSES = torch.tensor([
    [5, 6, 7, EOS, PAD],     # ends in EOS: n = 4 (EOS included), one pad
    [8, 9, 10, 11, 12],      # truncated, no EOS: n = 5
    [EOS, PAD, PAD, PAD, PAD],  # only EOS: n = 1
    [4, EOS, EOS, EOS, EOS],  # pad == eos (Llama style): n = 2
])
MASK = response_mask(RESPONSES, EOS)
LENGTHS = [4, 5, 1, 2]
SCORES = torch.tensor([1.5, -2.0, 0.7, 3.0])


def cfg(name: str, beta: float = 0.8, add_seq: bool = False, weights: str = "") -> SimpleNamespace:
    return SimpleNamespace(reward_calculator=name, abc_beta=beta, tlcr_add_sequence_reward=add_seq,
                           composite_weights=weights)


def inputs(**kw) -> RewardInputs:
    g = torch.Generator().manual_seed(0)
    # attention maps and discriminator outputs carry garbage on padding on purpose
    defaults = dict(mask=MASK, scores=SCORES,
                    rm_attention=torch.rand(4, 5, generator=g),
                    policy_attention=torch.rand(4, 5, generator=g) * 3,
                    token_rewards=torch.rand(4, 5, generator=g) * 2 - 1,
                    gold_credit=torch.randn(4, 5, generator=g))
    defaults.update(kw)
    return RewardInputs(**defaults)


def assert_zero_on_padding(r: torch.Tensor):
    assert torch.all(r[MASK == 0] == 0), r


# ---- response_mask -------------------------------------------------------------------
def test_mask_fixture_is_what_the_rows_say():
    assert MASK.sum(-1).tolist() == LENGTHS


def test_response_mask_eos_counts_and_everything_after_is_zero():
    resp = torch.tensor([[5, EOS, 7, EOS, 9], [EOS, 3, 3, 3, 3], [4, 4, 4, 4, EOS]])
    assert response_mask(resp, EOS).tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_response_mask_without_eos_is_all_ones():
    resp = torch.tensor([[5, 6, 7], [3, 3, 3]])
    assert response_mask(resp, EOS).tolist() == [[1, 1, 1], [1, 1, 1]]


# ---- helpers -------------------------------------------------------------------------
def test_at_last_puts_values_on_the_last_response_token():
    out = at_last(MASK, SCORES)
    expected = torch.zeros(4, 5)
    for b, n in enumerate(LENGTHS):
        expected[b, n - 1] = SCORES[b]
    torch.testing.assert_close(out, expected)


def test_at_last_of_an_empty_response_is_zero():
    assert at_last(torch.zeros(1, 3, dtype=torch.long), torch.tensor([5.0])).abs().sum() == 0


def test_normalised_rows_sum_to_one_and_fall_back_to_uniform():
    w = torch.tensor([[1.0, 3.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 2.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    out = normalised(w, m)
    # row 0: [1, 3, 0] / 4 (9 is on padding); row 1: all zero -> uniform over 2;
    # row 2: negatives clamp to 0 -> [0, 2, 2, 0] / 4
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0],
                                                  [0.0, 0.5, 0.5, 0.0]]))


# ---- sparse / uniform ----------------------------------------------------------------
def test_sparse_puts_R_on_the_last_token():
    r = compute_rewards(inputs(), cfg("sparse"))
    # row 0: EOS at index 3; row 1 (no EOS): last token index 4; row 2: index 0; row 3: index 1
    expected = torch.tensor([[0, 0, 0, 1.5, 0], [0, 0, 0, 0, -2.0], [0.7, 0, 0, 0, 0], [0, 3.0, 0, 0, 0]])
    torch.testing.assert_close(r, expected)


def test_uniform_spreads_R_over_n_tokens():
    r = compute_rewards(inputs(), cfg("uniform"))
    # 1.5 / 4 = 0.375; -2 / 5 = -0.4; 0.7 / 1; 3 / 2 = 1.5
    expected = torch.tensor([[0.375] * 4 + [0], [-0.4] * 5, [0.7, 0, 0, 0, 0], [1.5, 1.5, 0, 0, 0]])
    torch.testing.assert_close(r, expected)


@pytest.mark.parametrize("name", ["sparse", "uniform"])
def test_sum_invariant_sparse_uniform(name):
    r = compute_rewards(inputs(), cfg(name))
    torch.testing.assert_close(r.sum(-1), SCORES, rtol=0, atol=1e-6)
    assert_zero_on_padding(r)


# ---- abc / abc_d ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["abc", "abc_d"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.8, 1.0])
def test_attention_credit_keeps_the_sum(name, beta):
    r = compute_rewards(inputs(), cfg(name, beta=beta))
    torch.testing.assert_close(r.sum(-1), SCORES, rtol=0, atol=1e-6)
    assert_zero_on_padding(r)


@pytest.mark.parametrize("name", ["abc", "abc_d"])
def test_beta_zero_is_sparse(name):
    torch.testing.assert_close(compute_rewards(inputs(), cfg(name, beta=0.0)),
                               compute_rewards(inputs(), cfg("sparse")))


@pytest.mark.parametrize("name,field", [("abc", "rm_attention"), ("abc_d", "policy_attention")])
def test_abc_formula_by_hand(name, field):
    """r_t = beta * alpha_t * R + (1 - beta) * R * [t = n], alpha = attention normalised on the response."""
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    att = torch.tensor([[1.0, 2.0, 3.0, 2.0, 5.0]])   # 5.0 sits on padding and must be ignored
    # alpha = [1, 2, 3, 2] / 8 = [0.125, 0.25, 0.375, 0.25]; R = 2, beta = 0.8
    # beta * alpha * R = 1.6 * alpha = [0.2, 0.4, 0.6, 0.4]; (1 - beta) * R = 0.4 on t = n
    # -> [0.2, 0.4, 0.6, 0.8, 0], sum 2.0
    r = compute_rewards(RewardInputs(mask=mask, scores=torch.tensor([2.0]), **{field: att}), cfg(name, beta=0.8))
    torch.testing.assert_close(r, torch.tensor([[0.2, 0.4, 0.6, 0.8, 0.0]]))


def test_abc_d_credit_by_hand_shifted_and_averaged_over_the_steps_that_saw_each_key():
    """ALGORITHMS.md (ABC-D): attention to y_i credits y_{i+1}; each credit is the mean over
    the steps that attended to y_i; steps and keys past the response are ignored."""
    mask = torch.tensor([[1, 1, 1, 0]])
    rows = torch.tensor([[[0.0, 0.0, 0.0, 0.0],     # step generating y_1: no response key yet
                          [0.6, 0.0, 0.0, 0.0],     # y_2's step sees y_1 (the rest went to the prompt)
                          [0.2, 0.4, 0.0, 0.0],     # y_3's step sees y_1, y_2
                          [0.1, 0.1, 0.1, 0.0]]])   # past the response: ignored
    # key y_1: mean(0.6, 0.2) = 0.4 -> credited to y_2; key y_2: mean(0.4) = 0.4 -> y_3;
    # y_1 gets 0, nothing lands past the response: [0, 0.4, 0.4, 0]
    credit = R.generator_attention_credit(rows, mask)
    torch.testing.assert_close(credit, torch.tensor([[0.0, 0.4, 0.4, 0.0]]))
    # through abc_d with beta = 1: alpha = [0, 0.5, 0.5], R = 2 -> [0, 1, 1, 0]
    # (column sums, the old bug, gave [0.8, 0.4, 0] unshifted: the last token got nothing)
    r = compute_rewards(RewardInputs(mask=mask, scores=torch.tensor([2.0]), policy_attention=credit),
                        cfg("abc_d", beta=1.0))
    torch.testing.assert_close(r, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))


def test_abc_d_credit_of_even_attention_is_nearly_flat_where_a_sum_was_steep():
    """Each step j spreads 1/(P + j) over its P prompt and j response keys. Key i's mean over
    the steps j > i falls gently with i; the old sum over steps falls as the step count does."""
    t, p = 6, 3
    rows = torch.zeros(1, t, t)
    for j in range(t):
        rows[0, j, :j] = 1.0 / (p + j)
    credit = R.generator_attention_credit(rows, torch.ones(1, t, dtype=torch.long))[0]
    # key y_1: mean(1/4, 1/5, 1/6, 1/7, 1/8) = 0.1769 -> y_2; key y_5: 1/8 -> y_6
    torch.testing.assert_close(credit[[0, 1, 5]], torch.tensor([0.0, 0.17690, 0.125]), rtol=1e-4, atol=0)
    summed = rows.sum(1)[0]          # the old column sums: 0.885 for y_1, 0.125 for y_5, 0 for y_6
    assert credit[1] / credit[5] < 1.5 and summed[0] / summed[4] > 7 and summed[5] == 0


def test_abc_beta_one_is_pure_attention():
    mask = torch.tensor([[1, 1, 1, 0]])
    att = torch.tensor([[0.5, 0.3, 0.2, 0.7]])
    # alpha = [0.5, 0.3, 0.2] (already sums to 1 on the response); R = -1 -> [-0.5, -0.3, -0.2, 0]
    r = compute_rewards(RewardInputs(mask=mask, scores=torch.tensor([-1.0]), rm_attention=att), cfg("abc", beta=1.0))
    torch.testing.assert_close(r, torch.tensor([[-0.5, -0.3, -0.2, 0.0]]))


def test_abc_with_all_zero_attention_falls_back_to_uniform_and_keeps_the_sum():
    r = compute_rewards(inputs(rm_attention=torch.zeros(4, 5)), cfg("abc", beta=1.0))
    torch.testing.assert_close(r, compute_rewards(inputs(), cfg("uniform")))


# ---- oracle --------------------------------------------------------------------------
def test_oracle_by_hand_gold_shares_per_token_and_the_rest_of_R_on_the_last():
    mask = torch.tensor([[1, 1, 1, 0]])
    credit = torch.tensor([[0.5, -0.2, 0.1, 9.0]])   # 9.0 sits on padding and must be ignored
    # shares [0.5, -0.2, 0.1] sum 0.4; R = 2 -> the last token gets 0.1 + (2 - 0.4) = 1.7
    r = compute_rewards(RewardInputs(mask=mask, scores=torch.tensor([2.0]), gold_credit=credit), cfg("oracle"))
    torch.testing.assert_close(r, torch.tensor([[0.5, -0.2, 1.7, 0.0]]))


def test_oracle_abc_by_hand_is_abc_with_the_gold_credit_magnitudes_as_attention():
    mask = torch.tensor([[1, 1, 1, 0]])
    credit = torch.tensor([[0.5, -0.2, 0.3, 9.0]])   # |credit| over the response: 0.5, 0.2, 0.3 (sum 1)
    # beta 0.5, R = 2: 0.5 * alpha * 2 = alpha on each token, plus 0.5 * 2 = 1 on the last
    r = compute_rewards(RewardInputs(mask=mask, scores=torch.tensor([2.0]), gold_credit=credit),
                        cfg("oracle_abc", beta=0.5))
    torch.testing.assert_close(r, torch.tensor([[0.5, 0.2, 1.3, 0.0]]))
    # every token keeps R's sign, where the oracle gives the bad word a negative reward
    negative = compute_rewards(RewardInputs(mask=mask, scores=torch.tensor([-2.0]), gold_credit=credit),
                               cfg("oracle_abc", beta=0.5))
    assert torch.all(negative[0, :3] < 0)


def test_oracle_sums_to_R_and_is_zero_on_padding():
    r = compute_rewards(inputs(), cfg("oracle"))
    torch.testing.assert_close(r.sum(-1), SCORES)
    assert_zero_on_padding(r)


# ---- tlcr ----------------------------------------------------------------------------
def test_tlcr_is_the_token_reward_in_range_and_zero_on_padding():
    inp = inputs()
    r = compute_rewards(inp, cfg("tlcr"))
    assert r.min() >= -1 and r.max() <= 1
    assert_zero_on_padding(r)
    torch.testing.assert_close(r, inp.token_rewards * MASK)


def test_tlcr_extremes_stay_in_range():
    tr = torch.tensor([[-1.0, 1.0, -1.0, 1.0, 1.0]]).expand(4, -1)
    r = compute_rewards(inputs(token_rewards=tr), cfg("tlcr"))
    assert r.min() == -1 and r.max() == 1


def test_tlcr_with_sequence_reward_adds_R_on_the_last_token():
    inp = inputs()
    r = compute_rewards(inp, cfg("tlcr", add_seq=True))
    token_sum = (inp.token_rewards * MASK).sum(-1)
    torch.testing.assert_close(r.sum(-1), token_sum + SCORES, rtol=0, atol=1e-6)
    torch.testing.assert_close(r - at_last(MASK, SCORES), inp.token_rewards * MASK)
    assert_zero_on_padding(r)


# ---- composite -----------------------------------------------------------------------
def test_composite_parts_parses_names_and_weights():
    assert composite_parts(cfg("composite", weights="abc:0.5, tlcr:0.25")) == [("abc", 0.5), ("tlcr", 0.25)]


def test_composite_is_the_weighted_sum_of_its_parts():
    inp = inputs()
    c = cfg("composite", beta=0.8, add_seq=True, weights="abc:0.5,tlcr:0.25,uniform:2")
    r = compute_rewards(inp, c)
    expected = (0.5 * compute_rewards(inp, cfg("abc", beta=0.8))
                + 0.25 * compute_rewards(inp, cfg("tlcr", add_seq=True))
                + 2.0 * compute_rewards(inp, cfg("uniform")))
    torch.testing.assert_close(r, expected)
    assert_zero_on_padding(r)


def test_composite_is_linear_in_the_sequence_reward():
    """Every part is linear in R given the token rewards: doubling R and the token rewards doubles r."""
    c = cfg("composite", weights="abc:0.7,sparse:0.3,tlcr:1")
    one = compute_rewards(inputs(), c)
    base = inputs()
    two = compute_rewards(inputs(scores=2 * SCORES, token_rewards=2 * base.token_rewards), c)
    torch.testing.assert_close(two, 2 * one)


def test_composite_of_sum_preserving_parts_sums_to_weighted_R():
    r = compute_rewards(inputs(), cfg("composite", weights="abc:0.6,uniform:0.4,abc_d:1"))
    # 0.6 R + 0.4 R + 1.0 R = 2 R
    torch.testing.assert_close(r.sum(-1), 2 * SCORES, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights,word", [("abc:0.5,nope:0.5", "nope"), ("abc:x", "--composite_weights"),
                                          ("composite:1", "composite")])
def test_composite_bad_weights_raise_config_error(weights, word):
    with pytest.raises(ConfigError, match=word):
        compute_rewards(inputs(), cfg("composite", weights=weights))


# ---- needs, lookup, registration -----------------------------------------------------
@pytest.mark.parametrize("name,needs", [
    ("sparse", set()), ("uniform", set()), ("abc", {"rm_attention"}),
    ("abc_d", {"policy_attention"}), ("tlcr", {"token_rewards"})])
def test_needs_of_single_calculators(name, needs):
    assert needs_of(cfg(name)) == needs


def test_needs_of_composite_is_the_union_of_its_parts():
    assert needs_of(cfg("composite", weights="abc:0.5,tlcr:0.5")) == {"rm_attention", "token_rewards"}
    assert needs_of(cfg("composite", weights="abc_d:1,uniform:1,sparse:2")) == {"policy_attention"}
    assert needs_of(cfg("composite", weights="sparse:1,uniform:1")) == set()


def test_unknown_calculator_raises_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match="--reward_calculator") as err:
        get_calculator("attention_please")
    assert "attention_please" in str(err.value)
    with pytest.raises(ConfigError, match="--reward_calculator"):
        compute_rewards(inputs(), cfg("attention_please"))
    with pytest.raises(ConfigError, match="--reward_calculator"):
        needs_of(cfg("attention_please"))


@pytest.fixture
def clean_registry():
    before = dict(R.REGISTRY)
    yield
    R.REGISTRY.clear()
    R.REGISTRY.update(before)


def test_registering_a_calculator_makes_it_usable(clean_registry):
    @register("test_half_and_ones", needs=("token_rewards",))
    def half_and_ones(inp, c):
        # 1.0 everywhere (padding too: compute_rewards must mask it) plus R / 2 on the last token
        return torch.ones(inp.mask.shape) + at_last(inp.mask, inp.scores / 2)

    assert get_calculator("test_half_and_ones").fn is half_and_ones
    assert needs_of(cfg("test_half_and_ones")) == {"token_rewards"}
    r = compute_rewards(inputs(), cfg("test_half_and_ones"))
    assert_zero_on_padding(r)
    # sum = n * 1 + R / 2
    torch.testing.assert_close(r.sum(-1), torch.tensor(LENGTHS, dtype=torch.float) + SCORES / 2)
    # usable as a composite part, its needs join the union
    c = cfg("composite", weights="test_half_and_ones:2,abc:1")
    assert needs_of(c) == {"token_rewards", "rm_attention"}
    torch.testing.assert_close(compute_rewards(inputs(), c), 2 * r + compute_rewards(inputs(), cfg("abc")))


def test_registry_is_clean_after_registration_test():
    assert "test_half_and_ones" not in R.REGISTRY
    assert {"sparse", "uniform", "abc", "abc_d", "tlcr", "composite"} <= set(R.REGISTRY)


def test_calculators_marked_total_is_score_sum_to_R():
    """The ReMax baseline skips a calculator's inputs for the greedy response when it is
    marked total_is_score (common/rewards.py): the mark must be true, and only where it is."""
    marked = sorted(n for n, c in R.REGISTRY.items() if c.total_is_score)
    assert marked == ["abc", "abc_d", "oracle", "oracle_abc", "sparse", "uniform"]
    for name in R.REGISTRY:
        c = cfg(name, weights="abc:0.7,tlcr:0.5")
        r = compute_rewards(inputs(), c)
        sums_to_R = torch.allclose(r.sum(-1), SCORES, atol=1e-6)
        assert sums_to_R == (name in marked), name
