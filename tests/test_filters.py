"""Filters: exact rows kept by every filter on a small hand-built scored frame, and the ReST schedule."""

from __future__ import annotations

import math

import polars as pl
import pytest

from alignment import filters

# (prompt_id, completion, sample_idx, reward), deliberately not in (prompt_id, sample_idx) order.
ROWS = [
    (1, "y", 1, 0.75),
    (0, "a", 0, 1.0),
    (0, "b", 1, 0.0),
    (2, "q", 0, 0.0),
    (0, "a", 2, 1.0),  # repeats (0, "a", 0)
    (1, "x", 0, 0.25),
    (0, "c", 3, 0.5),
    (2, "q", 1, 0.0),  # repeats (2, "q", 0)
    (1, "z", 2, 0.75),  # ties (1, "y", 1)
]
SCHEMA = {"prompt_id": pl.Int64, "completion": pl.Utf8, "sample_idx": pl.Int32, "reward": pl.Float64}


def frame(rows=ROWS) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def rows(df: pl.DataFrame) -> list[tuple]:
    """The kept rows, as (prompt_id, completion, sample_idx, reward[, threshold]) tuples, in output order."""
    cols = [c for c in ("prompt_id", "completion", "sample_idx", "reward", "threshold") if c in df.columns]
    return [tuple(r) for r in df.select(cols).iter_rows()]


def test_dedupe_keeps_the_first_sample_of_each_repeated_completion_per_prompt():
    assert rows(filters.dedupe(frame())) == [
        (0, "a", 0, 1.0),
        (0, "b", 1, 0.0),
        (0, "c", 3, 0.5),
        (1, "x", 0, 0.25),
        (1, "y", 1, 0.75),
        (1, "z", 2, 0.75),
        (2, "q", 0, 0.0),
    ]


def test_dedupe_keeps_the_same_text_for_different_prompts_and_prefers_labelled_rows():
    scored = frame([(5, "7", 3, 1.0), (5, "7", -1, 1.0), (6, "7", 0, 0.0), (5, "8", 1, 0.0)])
    assert rows(filters.dedupe(scored)) == [(5, "7", -1, 1.0), (5, "8", 1, 0.0), (6, "7", 0, 0.0)]


def test_fixed_keeps_rewards_at_or_above_the_threshold_in_input_order():
    assert rows(filters.at_least(frame(), 0.5)) == [
        (1, "y", 1, 0.75, 0.5),
        (0, "a", 0, 1.0, 0.5),
        (0, "a", 2, 1.0, 0.5),
        (0, "c", 3, 0.5, 0.5),
        (1, "z", 2, 0.75, 0.5),
    ]
    assert rows(filters.at_least(filters.dedupe(frame()), 0.75)) == [
        (0, "a", 0, 1.0, 0.75),
        (1, "y", 1, 0.75, 0.75),
        (1, "z", 2, 0.75, 0.75),
    ]


def test_fixed_above_every_reward_keeps_nothing_but_keeps_the_schema():
    kept = filters.at_least(frame(), 2.0)
    assert kept.height == 0
    assert kept.schema == pl.Schema({**SCHEMA, "threshold": pl.Float64})


def test_fixed_keeps_the_input_columns_untouched():
    scored = frame().with_columns(pl.lit("p").alias("prompt"), pl.lit("v1").alias("policy_version"))
    kept = filters.at_least(scored, 1.0)
    assert kept.columns == [*scored.columns, "threshold"]
    assert kept.drop("threshold").to_dicts() == scored.filter(pl.col("reward") >= 1.0).to_dicts()


def test_quantile_threshold_is_the_linear_quantile_of_all_rewards():
    # Sorted rewards: 0, 0, 0, 0.25, 0.5, 0.75, 0.75, 1, 1. Linear interpolation at position 8q:
    # q=0.5 -> 0.5 exactly; q=0.6 -> position 4.8 -> 0.5 + 0.8 * (0.75 - 0.5) = 0.7.
    assert filters.quantile_threshold(frame(), 0.6) == pytest.approx(0.7)
    assert [filters.quantile_threshold(frame(), q) for q in (0.0, 0.5, 1.0)] == [0.0, 0.5, 1.0]
    kept = filters.at_least(frame(), filters.quantile_threshold(frame(), 0.6))
    assert rows(kept.drop("threshold")) == [(1, "y", 1, 0.75), (0, "a", 0, 1.0), (0, "a", 2, 1.0), (1, "z", 2, 0.75)]
    assert kept["threshold"].to_list() == pytest.approx([0.7] * 4)
    assert filters.at_least(frame(), filters.quantile_threshold(frame(), 0.0)).height == len(ROWS)


def test_quantile_threshold_without_rewards_is_zero():
    assert filters.quantile_threshold(frame([]), 0.5) == 0.0
    assert filters.quantile_threshold(frame([(0, "a", -1, None)]), 0.5) == 0.0  # a demonstration has no reward


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # V_pi is the mean of the policy's own rewards (0, 0.5, 1 -> 0.5; the demonstration's 0 is left
        # out), R_max the best of all: tau_i = 0.5 + i/3 * (1 - 0.5).
        (["filter.kind=rest"], [0.5 + 0.5 / 3, 0.5 + 1.0 / 3]),
        (["filter.kind=quantile", "filter.quantile=0.5"], [0.25, 0.25]),  # over all rewards: 0, 0, 0.5, 1
        (["filter.kind=fixed", "filter.threshold=0.7"], [0.7, 0.7]),
        (["filter.kind=top_k", "filter.k=1"], [None, None]),
    ],
)
def test_each_filter_kind_derives_its_thresholds_from_the_committed_scored_stage(tmp_path, settings, expected):
    from alignment.recipe import load_recipe
    from tasks.context import RunRef
    from tasks.filter import compute_thresholds
    from tasks.lake import Lake

    recipe = load_recipe("recipes/arithmetic-rest.yaml", ["improve.steps=2", *settings])
    ref = RunRef(run="thresholds", lake=f"file://{tmp_path}/lake", recipe=recipe, cache_dir=str(tmp_path / "cache"))
    scored = frame([(0, "a", 0, 0.0), (0, "b", 1, 0.5), (1, "c", 0, 1.0), (1, "d", -1, 0.0)])
    Lake(ref.lake).write_stage(ref.stage_uri(1, "scored"), [scored])
    assert compute_thresholds(ref, ref.stage_uri(1, "scored")) == pytest.approx(expected)


def test_top_k_keeps_the_best_k_per_prompt_ties_broken_by_sample_index():
    assert rows(filters.top_k(frame(), 1)) == [
        (0, "a", 0, 1.0, 1.0),
        (1, "y", 1, 0.75, 0.75),
        (2, "q", 0, 0.0, 0.0),
    ]
    # The threshold of top-k is per prompt: the lowest reward kept for it.
    assert rows(filters.top_k(frame(), 2)) == [
        (0, "a", 0, 1.0, 1.0),
        (0, "a", 2, 1.0, 1.0),
        (1, "y", 1, 0.75, 0.75),
        (1, "z", 2, 0.75, 0.75),
        (2, "q", 0, 0.0, 0.0),
        (2, "q", 1, 0.0, 0.0),
    ]
    assert rows(filters.top_k(filters.dedupe(frame()), 2)) == [
        (0, "a", 0, 1.0, 0.5),
        (0, "c", 3, 0.5, 0.5),
        (1, "y", 1, 0.75, 0.75),
        (1, "z", 2, 0.75, 0.75),
        (2, "q", 0, 0.0, 0.0),
    ]


def test_top_k_larger_than_a_group_keeps_the_whole_group_sorted_by_reward():
    kept = filters.top_k(frame(), 10)
    assert kept.height == len(ROWS)
    assert rows(kept.filter(pl.col("prompt_id") == 1)) == [
        (1, "y", 1, 0.75, 0.25),
        (1, "z", 2, 0.75, 0.25),
        (1, "x", 0, 0.25, 0.25),
    ]


def test_filters_do_not_depend_on_input_row_order():
    shuffled = frame().sample(fraction=1.0, shuffle=True, seed=7)
    assert rows(filters.dedupe(shuffled)) == rows(filters.dedupe(frame()))
    assert rows(filters.top_k(shuffled, 2)) == rows(filters.top_k(frame(), 2))
    assert sorted(rows(filters.at_least(shuffled, 0.5))) == sorted(rows(filters.at_least(frame(), 0.5)))


def test_rest_thresholds_are_spread_between_the_mean_and_the_best_reward():
    # gap 0.75 split in quarters: 0.25 + 0.75 * (1/4, 2/4, 3/4); all exact in binary.
    assert filters.rest_thresholds(0.25, 1.0, 3) == [0.4375, 0.625, 0.8125]
    assert filters.rest_thresholds(0.25, 1.0, 1) == [0.625]


@pytest.mark.parametrize(
    ("mean", "best", "steps"),
    [(0.25, 1.0, 1), (0.25, 1.0, 4), (0.0, 1.0, 3), (-2.0, 5.0, 2), (0.999, 1.0, 5), (0.3, 0.3000001, 3)],
)
def test_rest_schedule_starts_above_the_mean_and_rises_strictly(mean, best, steps):
    taus = filters.rest_thresholds(mean, best, steps)
    assert len(taus) == steps
    assert taus[0] > mean
    assert all(b > a for a, b in zip(taus, taus[1:]))
    assert taus[-1] <= best


@pytest.mark.parametrize("reward", [0.0, 1.0, 0.5])
def test_rest_schedule_when_every_sample_has_the_same_reward_keeps_nothing(reward):
    # Algorithm 1 asks for tau_1 > V_pi; when no sample beats the mean there is nothing to keep
    # (training on a batch of all-wrong samples would be worse than skipping the step).
    scored = frame([(0, "a", 0, reward), (0, "b", 1, reward), (1, "c", 0, reward)])
    taus = filters.rest_thresholds(reward, reward, 3)
    assert taus[0] > reward and all(b > a for a, b in zip(taus, taus[1:]))
    assert all(math.isfinite(t) for t in taus)
    for tau in taus:
        assert filters.at_least(scored, tau).height == 0


def test_rest_schedule_on_the_scored_frame_keeps_only_rows_above_the_mean():
    scored = frame()
    mean = scored["reward"].mean()  # 4.25 / 9
    taus = filters.rest_thresholds(mean, scored["reward"].max(), 2)
    kept = [rows(filters.at_least(filters.dedupe(scored), tau).drop("threshold")) for tau in taus]
    # tau_1 = mean + (1 - mean) / 3 ~ 0.63, tau_2 = mean + 2 (1 - mean) / 3 ~ 0.81
    assert kept[0] == [(0, "a", 0, 1.0), (1, "y", 1, 0.75), (1, "z", 2, 0.75)]
    assert kept[1] == [(0, "a", 0, 1.0)]


def test_decisions_give_every_scored_row_one_reason():
    scored = pl.DataFrame({
        "prompt_id": [1, 1, 1, 1, 2, 2], "sample_idx": [0, 1, 2, 3, 0, 1],
        "completion": ["a", "a", "b", "c", "d", "e"], "reward": [1.0, 1.0, 0.2, 0.9, 0.0, 1.0],
        "finish_reason": ["stop", "stop", "stop", "length", "stop", "stop"],
    })  # fmt: skip
    finished = filters.drop_truncated(scored)
    pool = filters.dedupe(finished)
    kept = filters.at_least(pool, 0.5)
    fates = filters.decisions(scored, finished, pool, kept, threshold=0.5)
    assert fates.rows() == [
        (1, 0, "kept", "kept", 0.5), (1, 1, "dropped", "duplicate", 0.5), (1, 2, "dropped", "below_threshold", 0.5),
        (1, 3, "dropped", "truncated", 0.5), (2, 0, "dropped", "below_threshold", 0.5), (2, 1, "kept", "kept", 0.5),
    ]
