"""The experiment report's statistics and their words, on a synthetic CSV worked by hand: smoothing,
the speed to a common target with its bootstrap interval, paired gains, partial grids, fronts."""
from __future__ import annotations

import pytest

from experiments import stats


def synthetic_rows() -> list[dict]:
    """sparse peaks at 0.6 on step 4; abc passes 0.6 at step 2 (mean of 0.5 and 0.8 is 0.65)."""
    gold = {("sparse", 1): [0.0, 0.2, 0.5, 0.3], ("sparse", 2): [0.0, 0.4, 0.7, 0.5],
            ("abc", 1): [0.0, 0.5, 0.6, 0.6], ("abc", 2): [0.0, 0.8, 0.9, 0.4],
            ("uniform", 1): [0.0, 0.1, 0.1, 0.1]}
    return [{"run_id": f"{c}-s{s}", "calculator": c, "seed": str(s), "step": str(step), "gold_reward": str(g)}
            for (c, s), values in gold.items() for step, g in zip((0, 2, 4, 6), values)]


def test_curve_mean_and_standard_error_over_seeds():
    c = stats.curve([r for r in synthetic_rows() if r["calculator"] == "abc"], "gold_reward")
    assert c.steps == [0, 2, 4, 6] and c.seeds == 2
    assert c.mean == pytest.approx([0.0, 0.65, 0.75, 0.5])
    # two seeds: sample std |a - b| / sqrt(2), standard error that over sqrt(2) = |a - b| / 2
    assert c.se == pytest.approx([0.0, 0.15, 0.15, 0.1])
    one = stats.curve([r for r in synthetic_rows() if r["calculator"] == "uniform"], "gold_reward")
    assert one.se == [0.0] * 4  # one seed: no band


def test_smoothing_is_a_trailing_moving_average():
    assert stats.smoothed([0.0, 3.0, 6.0, 0.0], 3) == pytest.approx([0.0, 1.5, 3.0, 3.0])
    assert stats.smoothed([1.0, 2.0], 1) == [1.0, 2.0]


def test_speed_to_a_common_target_with_a_bootstrap_interval_by_hand():
    # means: sparse [0, 0.3, 0.6, 0.4], abc [0, 0.65, 0.75, 0.5], uniform [0, 0.1, 0.1, 0.1]; start 0,
    # best 0.75, target 0.5 * 0.75 = 0.375: sparse first at step 4, abc at 2, uniform never
    sp = stats.speed_table(synthetic_rows(), "gold_reward", fraction=0.5, window=1)
    assert (sp.start, sp.best, sp.target) == pytest.approx((0.0, 0.75, 0.375))
    t = {r["calculator"]: r for r in sp.rows}
    assert [t[c]["step"] for c in ("sparse", "abc", "uniform")] == [4, 2, None]
    assert t["abc"]["ratio"] == 0.5 and t["sparse"]["ratio"] == 1.0 and t["uniform"]["ratio"] is None
    # resampled seeds: abc reaches the target at step 2 in every resample; sparse at 2 only when both
    # draws are seed 2 (1 in 4), else at 4: abc's ratio is 0.5 or 1.0, so the interval is [0.5, 1]
    assert t["abc"]["ci"] == (0.5, 1.0) and t["sparse"]["ci"] == (1.0, 1.0)
    assert t["uniform"]["ci"] is None  # one seed: every resample is that seed, an interval of nothing
    assert t["abc"]["mean_all_steps"] == pytest.approx((0 + 0.65 + 0.75 + 0.5) / 4)
    assert t["abc"]["final"] == pytest.approx(0.5) and t["abc"]["final_se"] == pytest.approx(0.1)


def test_speed_target_is_common_not_sparse_own_peak():
    """sparse's own noisy peak is not the target: with 3-point smoothing the target comes from the
    best smoothed curve of any calculator."""
    sp = stats.speed_table(synthetic_rows(), "gold_reward", fraction=0.9, window=3)
    # abc smoothed: [0, 0.325, 0.4667, 0.6333] is the best (0.6333); target 0.57
    assert sp.best == pytest.approx(0.63333, abs=1e-4) and sp.target == pytest.approx(0.57, abs=1e-4)
    t = {r["calculator"]: r for r in sp.rows}
    assert t["abc"]["step"] == 6 and t["sparse"]["step"] is None and t["sparse"]["ratio"] is None


def test_findings_when_sparse_never_reaches_the_target():
    """abc reaches the 0.9 target at step 6 and sparse never: the ratio is undefined, but the
    bootstrap still says how sure that is (a resample where sparse never gets there counts 0)."""
    from experiments.report import findings, ratio_text
    sp = stats.speed_table(synthetic_rows(), "gold_reward", fraction=0.9, window=3)
    abc = {r["calculator"]: r for r in sp.rows}["abc"]
    lo, hi = abc["ci"]
    assert lo == 0.0 and ratio_text(abc) == f"sparse never [0.00, {hi:.2f}]"
    verdict = "excludes 1: faster than sparse" if hi < 1 else "includes 1: not shown faster than sparse"
    assert findings(sp).startswith(f"abc reached it at step 6, sparse never (the interval {verdict}).")


def test_a_table_where_no_run_rose_says_there_is_no_speed():
    """Falling curves put the target at the start: every calculator is there at step 0, which is not
    "sparse never" (what the table said) but no speed to compare."""
    from experiments.report import speed_markdown
    rows = [{**r, "gold_reward": str(-float(r["gold_reward"]))} for r in synthetic_rows()]
    sp = stats.speed_table(rows, "gold_reward", fraction=0.9, window=3)
    assert [t["step"] for t in sp.rows] == [0, 0, 0]
    table = speed_markdown(sp, "gold_reward")
    assert "No calculator's smoothed mean rose above the start: there is no speed to compare." in table
    assert "sparse never" not in table and table.count("| 0 | sparse at the start |") == 3


def test_findings_put_the_table_in_words():
    from experiments.report import findings, ratio_text
    sp = stats.speed_table(synthetic_rows(), "gold_reward", fraction=0.5, window=1)
    t = {r["calculator"]: r for r in sp.rows}
    assert ratio_text(t["abc"]) == "0.50 [0.50, 1.00]" and ratio_text(t["uniform"]) == "never"
    # abc's final 0.5 +- 0.1 is within 2 * sqrt(0.1^2 + 0.1^2) of sparse's 0.4 +- 0.1; uniform's 0.1 is not
    assert findings(sp) == ("abc reached it at 0.50 x sparse's steps (the interval includes 1: not shown "
                            "faster than sparse). uniform never reached the target. Final value within two "
                            "standard errors of sparse's: abc.")


def test_paired_gains_over_sparse_seed_by_seed_by_hand():
    # means over the steps: sparse s1 0.25, s2 0.4; abc s1 0.425, s2 0.525; uniform s1 0.075
    gains = stats.paired_gains(synthetic_rows(), "gold_reward")
    assert set(gains) == {"abc", "uniform"}
    mean, se, ahead, paired = gains["abc"]  # differences 0.175 and 0.125
    assert (mean, se, ahead, paired) == pytest.approx((0.15, 0.025, 2, 2))
    assert gains["uniform"] == pytest.approx((-0.175, 0.0, 0, 1))


def test_findings_name_the_paired_gains_beyond_two_standard_errors():
    from experiments.report import findings
    sp = stats.speed_table(synthetic_rows(), "gold_reward", fraction=0.5, window=1)
    words = findings(sp, stats.paired_gains(synthetic_rows(), "gold_reward"))
    # abc: 0.15 > 2 x 0.025; uniform has one seed, no standard error to compare with
    assert words.endswith("Paired by seed, the mean over the run differs from sparse's by more than two standard "
                          "errors for: abc (+0.150 ± 0.025, 2 of 2 seeds ahead).")


def test_partial_grids_compare_common_seeds_only():
    rows = stats.common_seeds(synthetic_rows(), "calculator")  # uniform has seed 1 only
    assert {r["run_id"] for r in rows} == {"sparse-s1", "abc-s1", "uniform-s1"}


def test_front_keeps_the_non_dominated_points():
    # both maximised: (-3, 0.4) is dominated by (-2, 0.5), (-1.5, 0.05) by (-1, 0.1)
    points = [{"x": -1.0, "gold": 0.1}, {"x": -2.0, "gold": 0.5}, {"x": -3.0, "gold": 0.4}, {"x": -0.5, "gold": 0.0},
              {"x": -1.5, "gold": 0.05}]
    assert [p["x"] for p in stats.front(points, "x", "gold")] == [-2.0, -1.0, -0.5]
