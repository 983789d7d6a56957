"""Filters over a scored polars frame: which grown samples the Improve step trains on.

A scored frame has at least ``prompt_id``, ``completion`` and ``reward``. Every filter keeps
rows with ``reward >= threshold`` (or the best ``k`` per prompt), adds a ``threshold`` column
recording the value it used, and can drop identical completions for one prompt first. Samples that
``max_new_tokens`` cut off (``finish_reason == "length"``) are dropped first unless the recipe keeps
them, and labelled demonstrations (no reference, so no reward: ``reward`` is null) always pass.

The ReST schedule follows Algorithm 1 of ReST (Gulcehre et al., arXiv 2308.08998): choose
``tau_1 > V_pi`` where ``V_pi = E_{D_g}[R(x, y)]`` is the policy's mean reward on the grown
data, and ``tau_{i+1} > tau_i`` for each further Improve step. Here the thresholds are spread
evenly between the mean and the best reward seen: ``tau_i = V + i/(I+1) * (R_max - V)``.
"""

from __future__ import annotations

import math

import polars as pl


TRUNCATED = "length"


def drop_truncated(scored: pl.DataFrame) -> pl.DataFrame:
    """Drop samples that ended because ``max_new_tokens`` ran out: they are not finished answers."""
    if "finish_reason" not in scored.columns:
        return scored
    return scored.filter(pl.col("finish_reason").fill_null("stop") != TRUNCATED)


def dedupe(scored: pl.DataFrame) -> pl.DataFrame:
    """Keep the first of identical completions for one prompt (by ``sample_idx`` order)."""
    order = [c for c in ("prompt_id", "sample_idx") if c in scored.columns]
    return scored.sort(order).unique(subset=["prompt_id", "completion"], keep="first", maintain_order=True)


def rest_thresholds(mean_reward: float, max_reward: float, improve_steps: int) -> list[float]:
    """Thresholds ``tau_1 < ... < tau_I``, all strictly above the mean reward.

    When no reward beats the mean (every sample scored the same) the thresholds sit just above
    it, so the filter keeps nothing rather than training on samples no better than the policy.
    """
    gap = max(0.0, max_reward - mean_reward)
    taus, prev = [], mean_reward
    for i in range(1, improve_steps + 1):
        prev = max(mean_reward + (i / (improve_steps + 1)) * gap, math.nextafter(prev, math.inf))
        taus.append(prev)
    return taus


def at_least(scored: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """Keep rows with ``reward >= threshold``."""
    keep = (pl.col("reward") >= threshold) | pl.col("reward").is_null()  # a demonstration has no reward and passes
    return scored.filter(keep).with_columns(pl.lit(float(threshold)).alias("threshold"))


def quantile_threshold(scored: pl.DataFrame, q: float) -> float:
    """The quantile filter's threshold: the ``q``-quantile (linear) of all rewards, 0 when there are none.

    It is scale-free, so it suits rewards on an arbitrary scale (a reward model's); ``at_least`` keeps the
    rows at or above it.
    """
    return float(scored["reward"].quantile(q, interpolation="linear") or 0.0) if scored.height else 0.0


def top_k(scored: pl.DataFrame, k: int) -> pl.DataFrame:
    """Keep the ``k`` highest-reward rows per prompt (ties broken by ``sample_idx``)."""
    ranked = scored.sort(["prompt_id", "reward", "sample_idx"], descending=[False, True, False], nulls_last=False)
    kept = ranked.group_by("prompt_id", maintain_order=True).head(k)
    # The threshold of a top-k filter is per prompt: the lowest reward kept for that prompt.
    return kept.with_columns(pl.col("reward").min().over("prompt_id").alias("threshold"))


def decisions(scored: pl.DataFrame, finished: pl.DataFrame, pool: pl.DataFrame, kept: pl.DataFrame, *,
              threshold: float | None, top_k: bool = False) -> pl.DataFrame:
    """Every scored row's fate in one Improve step: ``decision`` (kept / dropped), its ``reason``
    (``kept``, ``truncated``, ``duplicate``, ``below_threshold`` or ``not_top_k``) and the threshold used.

    ``finished``, ``pool`` and ``kept`` are the rows left after each filter stage, in that order.
    """
    steps = [("truncated", finished), ("duplicate", pool), ("not_top_k" if top_k else "below_threshold", kept)]
    return fates(scored, steps, threshold=threshold)


def pair_decisions(scored: pl.DataFrame, rewarded: pl.DataFrame, finished: pl.DataFrame, pairs: pl.DataFrame) -> pl.DataFrame:
    """Every scored row's fate in one preference step: ``kept`` when a pair uses it (as chosen or rejected),
    else dropped as ``no_reward`` (a demonstration), ``truncated`` or ``no_pair``."""
    used = pl.concat([
        pairs.select("prompt_id", pl.col("chosen_idx").alias("sample_idx")),
        pairs.select("prompt_id", pl.col("rejected_idx").alias("sample_idx")),
    ]).unique().cast({"sample_idx": scored.schema["sample_idx"]})  # fmt: skip
    used = finished.join(used, on=["prompt_id", "sample_idx"], how="semi")
    return fates(scored, [("no_reward", rewarded), ("truncated", finished), ("no_pair", used)], threshold=None)


def fates(scored: pl.DataFrame, steps: list[tuple[str, pl.DataFrame]], *, threshold: float | None) -> pl.DataFrame:
    """``decision``, ``reason`` and ``threshold`` per scored row: ``steps`` are (reason, rows left after
    that step) in order; a row first missing after a step was dropped for its reason, the last rows are kept."""
    key = ["prompt_id", "sample_idx"]
    frames, before = [], scored
    for reason, after in steps:
        frames.append(before.select(key).join(after.select(key), on=key, how="anti").with_columns(pl.lit(reason).alias("reason")))
        before = after
    frames.append(before.select(key).with_columns(pl.lit("kept").alias("reason")))
    out = pl.concat(frames).with_columns(
        pl.when(pl.col("reason") == "kept").then(pl.lit("kept")).otherwise(pl.lit("dropped")).alias("decision"),
        pl.lit(threshold, pl.Float64).alias("threshold"),
    )
    return out.sort(key).select(*key, "decision", "reason", "threshold")
