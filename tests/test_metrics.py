"""Step metrics and the promotion gate: exact values on small hand-built frames (as tests/test_filters.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import polars as pl
import pytest

from alignment import metrics

SCHEMA = {"prompt_id": pl.Int64, "sample_idx": pl.Int32, "reward": pl.Float64, "num_tokens": pl.Int32, "finish_reason": pl.Utf8}
# Two prompts, four samples each, and one labelled demonstration per prompt (sample_idx -1).
GROWN = [
    (0, 0, 1.0, 2, "stop"), (0, 1, 0.0, 3, "stop"), (0, 2, 1.0, 2, "stop"), (0, 3, 0.5, 5, "length"),
    (1, 0, 0.0, 4, "stop"), (1, 1, 0.0, 4, "stop"), (1, 2, 0.0, 4, "stop"), (1, 3, 0.25, 4, "length"),
    (0, -1, None, 0, "stop"), (1, -1, 1.0, 0, "stop"),
]
KEPT = [(0, 0, 1.0, 2, "stop"), (0, 3, 0.5, 5, "length"), (1, -1, 1.0, 0, "stop")]


def frame(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def evals(pairs) -> pl.DataFrame:
    return pl.DataFrame(pairs, schema={"prompt_id": pl.Int64, "reward": pl.Float64}, orient="row")


def test_reward_stats_of_grown_samples_leave_the_labelled_rows_out():
    # own rewards, sorted: 0 0 0 0 .25 .5 1 1 (sum 2.75); squared deviations sum to 1.3671875
    assert metrics.reward_stats(frame(GROWN), "grown") == {
        "grown_reward_mean": 0.34375,
        "grown_reward_std": pytest.approx(math.sqrt(1.3671875 / 7), abs=1e-12),
        "grown_reward_p10": 0.0,   # position 0.7 between 0 and 0
        "grown_reward_p50": 0.125,  # position 3.5 between 0 and .25
        "grown_reward_p90": 1.0,   # position 6.3 between 1 and 1
    }


def test_reward_stats_of_kept_samples():
    assert metrics.reward_stats(frame(KEPT), "kept") == {
        "kept_reward_mean": 0.75, "kept_reward_std": pytest.approx(math.sqrt(0.125), abs=1e-12),
        "kept_reward_p10": pytest.approx(0.55), "kept_reward_p50": 0.75, "kept_reward_p90": pytest.approx(0.95),
    }


def test_reward_stats_of_no_rows_are_null():
    assert set(metrics.reward_stats(frame([]), "kept").values()) == {None}


def test_policy_samples_are_those_with_a_sample_index():
    assert frame(GROWN).select(metrics.is_policy_sample())["sample_idx"].to_list() == [True] * 8 + [False] * 2
    assert metrics.own(frame(GROWN)).height == 8
    assert metrics.own(evals([(0, 1.0)])).height == 1  # an eval frame has no demonstrations


def test_describe_every_non_null_value():
    rewards = frame(GROWN)["reward"]  # all ten rows: the labelled 1.0 counts, the null does not
    assert metrics.describe(rewards) == {
        # sorted: 0 0 0 0 .25 .5 1 1 1 (sum 3.75, squares 3.3125); quantiles at positions 0.8, 4 and 7.2
        "count": 9, "mean": pytest.approx(3.75 / 9), "std": pytest.approx(math.sqrt((3.3125 - 3.75**2 / 9) / 8)),
        "min": 0.0, "p10": 0.0, "p50": 0.25, "p90": 1.0, "max": 1.0, "positive": pytest.approx(5 / 9),
    }
    # the median of 0 .25 .5 1 is at position 1.5: linear halfway, nearest a value that occurs
    assert metrics.describe(pl.Series([0.0, 0.25, 0.5, 1.0]))["p50"] == 0.375
    assert metrics.describe(pl.Series([0.0, 0.25, 0.5, 1.0]), interpolation="nearest")["p50"] == 0.5
    one = metrics.describe(pl.Series([2.0]))
    assert one["count"] == 1 and one["std"] is None and one["p90"] == one["min"] == one["max"] == 2.0
    assert metrics.describe(pl.Series([None], dtype=pl.Float64)) == {"count": 0} | dict.fromkeys(
        ("mean", "std", "min", "p10", "p50", "p90", "max", "positive"))


def test_kept_fraction_and_prompt_coverage_count_own_samples_only():
    assert metrics.kept_fraction(frame(GROWN), frame(KEPT)) == 2 / 8
    # prompt 1 is kept only through its demonstration: not covered by the policy's own samples
    assert metrics.prompt_coverage(frame(GROWN), frame(KEPT)) == 0.5
    assert metrics.kept_fraction(frame([]), frame([])) is None


def test_pass_at_1_is_the_mean_per_prompt_fraction_and_pass_at_n_any_correct():
    assert metrics.pass_at(frame(GROWN)) == {"pass_at_1": 0.25, "pass_at_n": 0.5}  # prompt 0: 2/4, prompt 1: 0/4
    assert metrics.pass_at(frame([(5, 0, None, 1, "stop")])) == {"pass_at_1": None, "pass_at_n": None}


def test_length_stats_and_truncation_rate():
    assert metrics.length_stats(frame(GROWN), "grown") == {
        "grown_length_mean": 3.5, "grown_length_p90": pytest.approx(4.3), "grown_truncated": 0.25,
    }
    assert metrics.length_stats(frame(KEPT), "kept") == {
        "kept_length_mean": 3.5, "kept_length_p90": pytest.approx(4.7), "kept_truncated": 0.5,
    }


def test_win_rate_counts_ties_as_half_and_only_shared_prompts():
    candidate = evals([(0, 1.0), (1, 0.0), (2, 1.0), (3, 0.5), (4, 1.0)])
    champion = evals([(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0), (9, 1.0)])
    assert metrics.win_rate(candidate, champion) == (1 + 0.5 + 0.5 + 0 + 1) / 5
    assert metrics.win_rate(candidate, candidate) == 0.5
    assert metrics.win_rate(candidate, evals([(7, 1.0)])) is None


def test_kl_per_token_is_the_mean_of_per_token_log_ratios():
    rows = pl.DataFrame({"logp": [-2.0, -3.0, -1.0], "ref_logp": [-4.0, -3.0, -2.0], "tokens": [2, 3, 0]})
    assert metrics.kl_per_token(rows) == (2 / 2 + 0 / 3) / 2  # a row with no tokens is left out
    assert metrics.kl_per_token(rows.head(0)) is None


def test_throughput_is_own_samples_and_their_tokens_per_second():
    assert metrics.throughput(frame(GROWN), 2.0) == {"grow_samples_per_s": 4.0, "grow_tokens_per_s": 14.0}


def test_step_metrics_combine_every_figure():
    held_out = frame([(0, 0, 1.0, 2, "stop"), (1, 0, 0.0, 6, "length")])
    champion = evals([(0, 0.0), (1, 0.0)])
    out = metrics.step_metrics(frame(GROWN), frame(KEPT), held_out, champion)
    assert out["win_rate"] == 0.75 and out["eval_length_mean"] == 4.0 and out["eval_truncated"] == 0.5
    assert out["kept_fraction"] == 0.25 and out["pass_at_n"] == 0.5 and out["kept_reward_mean"] == 0.75
    pairs_step = metrics.step_metrics(frame(GROWN), None, held_out, None)
    assert "kept_fraction" not in pairs_step and pairs_step["win_rate"] is None


GATE = SimpleNamespace(min_improvement=0.0, max_length_drift=0.5, max_kl=0.2, max_reward_gap_widening=0.1)
BASE = {"eval_reward": 0.5, "eval_length": 4.0, "eval_kl": 0.0, "eval_train_reward": 0.9}  # gap 0.4


def test_a_clean_candidate_passes_every_check():
    cand = {"eval_reward": 0.7, "eval_length": 5.0, "eval_kl": 0.1, "eval_train_reward": 1.2}  # gap 0.5
    checks = metrics.promotion_checks(GATE, cand, 0.6, BASE, verifier_differs=True)
    assert checks == {
        "improvement": {"value": pytest.approx(0.1), "limit": 0.0, "passed": True},
        "length_drift": {"value": 0.25, "limit": 0.5, "passed": True},
        "kl": {"value": 0.1, "limit": 0.2, "passed": True},
        "reward_gap": {"value": pytest.approx(0.1), "limit": 0.1, "passed": True},
    }
    assert metrics.blocked_by(checks) == []


def test_each_guard_blocks_with_its_name():
    hacked = {"eval_reward": 0.7, "eval_length": 7.0, "eval_kl": 0.5, "eval_train_reward": 1.6}  # gap 0.9
    checks = metrics.promotion_checks(GATE, hacked, 0.6, BASE, verifier_differs=True)
    assert metrics.blocked_by(checks) == ["length_drift", "kl", "reward_gap"]
    assert checks["length_drift"]["value"] == 0.75 and checks["reward_gap"]["value"] == pytest.approx(0.5)
    flat = {**BASE, "eval_reward": 0.6}
    assert metrics.blocked_by(metrics.promotion_checks(GATE, flat, 0.6, BASE, verifier_differs=True)) == ["improvement"]


def test_guards_that_are_off_or_do_not_apply_are_not_checked():
    off = SimpleNamespace(min_improvement=0.0, max_length_drift=None, max_kl=None, max_reward_gap_widening=0.1)
    cand = {"eval_reward": 0.7, "eval_length": 40.0}
    # the training reward is the verifier: no gap to watch; no champion yet: improvement passes
    assert metrics.promotion_checks(off, cand, None, BASE, verifier_differs=False) == {
        "improvement": {"value": None, "limit": 0.0, "passed": True},
    }
