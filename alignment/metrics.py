"""What one turn of the flywheel did, as numbers: pure functions over the stage frames.

Each function reads the columns the lake's stages carry (``prompt_id``, ``sample_idx``, ``reward``,
``num_tokens``, ``finish_reason``; ``sample_idx`` −1 marks a labelled demonstration, whose reward
may be null) and returns plain floats, ``None`` where a number does not exist (no rows). The flows
log them per Improve step to MLflow and ``summary.json`` (``tasks/step_metrics.py``), and
``promotion_checks`` is the champion gate's guard against reward hacking (reward over-optimisation,
Gao et al. arXiv 2210.10760: a policy can raise the reward it trains on while the verifier stalls).

"Grown" and "kept" samples are the policy's own (``is_policy_sample``: ``sample_idx >= 0``): the
labelled data D that Algorithm 1 adds to every D_g would otherwise dilute every figure with the same
rows each iteration.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl

CORRECT = 1.0  # a reward of at least 1 is a correct answer (alignment.evaluation)
QUANTILES = (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))


def is_policy_sample() -> pl.Expr:
    """True on the policy's own samples, false on labelled demonstrations (``sample_idx`` −1)."""
    return pl.col("sample_idx") >= 0


def own(frame: pl.DataFrame) -> pl.DataFrame:
    """The policy's own samples: labelled demonstrations (``sample_idx`` −1) left out."""
    return frame.filter(is_policy_sample()) if "sample_idx" in frame.columns else frame


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def describe(values: pl.Series, *, interpolation: Literal["linear", "nearest"] = "linear") -> dict[str, Any]:
    """``count``, ``mean``, ``std`` (sample std, ddof 1), ``min``, ``p10``, ``p50``, ``p90``, ``max`` and
    ``positive`` (the share above 0) of the non-null values; each figure is ``None`` without values (``std``
    also with one). ``interpolation="nearest"`` makes every quantile a value that occurs."""
    r = values.drop_nulls().cast(pl.Float64)
    quantiles = {name: _num(r.quantile(q, interpolation=interpolation)) if r.len() else None for name, q in QUANTILES}
    return {"count": r.len(), "mean": _num(r.mean()), "std": _num(r.std()), "min": _num(r.min()), **quantiles,
            "max": _num(r.max()), "positive": _num((r > 0).mean()) if r.len() else None}


def reward_stats(frame: pl.DataFrame, prefix: str) -> dict[str, float | None]:
    """``{prefix}_reward_mean``, ``_std`` (sample std, ddof 1), ``_p10``, ``_p50``, ``_p90`` (linear) over the
    non-null rewards of the policy's own samples."""
    d = describe(own(frame)["reward"])
    return {f"{prefix}_reward_{k}": d[k] for k in ("mean", "std", *(name for name, _ in QUANTILES))}


def kept_fraction(grown: pl.DataFrame, kept: pl.DataFrame) -> float | None:
    """Share of the policy's own grown samples that the filter kept."""
    n = own(grown).height
    return own(kept).height / n if n else None


def prompt_coverage(grown: pl.DataFrame, kept: pl.DataFrame) -> float | None:
    """Share of grown prompts with at least one of their own samples kept (a filter that keeps only easy
    prompts trains on a narrowing slice of the task)."""
    prompts = own(grown)["prompt_id"].n_unique()
    return own(kept)["prompt_id"].n_unique() / prompts if prompts else None


def pass_at(grown: pl.DataFrame) -> dict[str, float | None]:
    """``pass@1`` (mean over prompts of the fraction of samples correct) and ``pass@N`` (share of prompts
    with any correct sample) on the training prompts; correct means reward >= 1."""
    rows = own(grown).filter(pl.col("reward").is_not_null())
    if rows.height == 0:
        return {"pass_at_1": None, "pass_at_n": None}
    per = rows.group_by("prompt_id").agg((pl.col("reward") >= CORRECT).mean().alias("frac"))
    return {"pass_at_1": float(per["frac"].mean()), "pass_at_n": float((per["frac"] > 0).mean())}


def length_stats(frame: pl.DataFrame, prefix: str) -> dict[str, float | None]:
    """``{prefix}_length_mean`` and ``_p90`` (linear) in tokens, and ``{prefix}_truncated``: the share cut off
    by ``max_new_tokens`` (``finish_reason == "length"``)."""
    rows = own(frame)
    if rows.height == 0:
        return {f"{prefix}_length_mean": None, f"{prefix}_length_p90": None, f"{prefix}_truncated": None}
    n = rows["num_tokens"].cast(pl.Float64)
    return {
        f"{prefix}_length_mean": float(n.mean()),
        f"{prefix}_length_p90": float(n.quantile(0.9, interpolation="linear")),
        f"{prefix}_truncated": float((rows["finish_reason"] == "length").mean()),
    }


def win_rate(candidate: pl.DataFrame, champion: pl.DataFrame) -> float | None:
    """Share of held-out prompts where the candidate's eval reward beats the champion's; a tie counts ½.

    Both frames are ``eval`` stages (one greedy completion per ``prompt_id``); prompts missing from
    either side are not counted.
    """
    both = candidate.select("prompt_id", "reward").join(
        champion.select("prompt_id", pl.col("reward").alias("champion")), on="prompt_id", how="inner"
    )
    if both.height == 0:
        return None
    score = pl.when(pl.col("reward") > pl.col("champion")).then(1.0).when(pl.col("reward") == pl.col("champion")).then(0.5).otherwise(0.0)
    return float(both.select(score.mean()).item())


def kl_per_token(frame: pl.DataFrame) -> float | None:
    """Per-token KL(policy ‖ reference) on held-out prompts: mean of ``(logp − ref_logp) / tokens``.

    This is the k1 estimator, ``log π(y|x) − log π_ref(y|x)``, on the policy's *greedy* held-out
    completions, not on samples from π: it is not an unbiased KL (it can even be negative), but it
    moves with the policy's drift from the reference at the cost of one forward pass of each model.
    ``logp`` and ``ref_logp`` are sequence log-probabilities, ``tokens`` the tokens scored.
    """
    rows = frame.filter(pl.col("tokens") > 0)
    if rows.height == 0:
        return None
    return float(rows.select(((pl.col("logp") - pl.col("ref_logp")) / pl.col("tokens")).mean()).item())


def throughput(grown: pl.DataFrame, seconds: float) -> dict[str, float | None]:
    """Grow's ``grow_samples_per_s`` and ``grow_tokens_per_s`` (completion tokens) over ``seconds`` of Grow."""
    rows = own(grown)
    if seconds <= 0:
        return {"grow_samples_per_s": None, "grow_tokens_per_s": None}
    return {"grow_samples_per_s": rows.height / seconds, "grow_tokens_per_s": float(rows["num_tokens"].sum()) / seconds}


def step_metrics(grown: pl.DataFrame, kept: pl.DataFrame | None, held_out: pl.DataFrame,
                 champion: pl.DataFrame | None) -> dict[str, float | None]:
    """Every frame-based figure of one Improve step: grown (and kept, for a filter's output) rewards and
    lengths, kept fraction, prompt coverage, pass@k, held-out lengths, and the win rate against the
    champion's held-out answers. ``kept`` is what the step trains on: a filter's rows, or the samples its
    pairs use."""
    out = reward_stats(grown, "grown") | pass_at(grown) | length_stats(grown, "grown")
    if kept is not None:
        out |= reward_stats(kept, "kept") | length_stats(kept, "kept")
        out |= {"kept_fraction": kept_fraction(grown, kept), "prompt_coverage": prompt_coverage(grown, kept)}
    out |= length_stats(held_out, "eval")
    out["win_rate"] = win_rate(held_out, champion) if champion is not None else None
    return out


# -- the promotion gate -------------------------------------------------------------------------

CHECKS = ("improvement", "length_drift", "kl", "reward_gap")


def promotion_checks(
    cfg: Any,
    candidate: dict[str, float],
    champion_reward: float | None,
    baseline: dict[str, float],
    *,
    verifier_differs: bool,
) -> dict[str, dict[str, Any]]:
    """The champion gate: ``{check: {"value", "limit", "passed"}}`` for every check that is on.

    - ``improvement``: held-out reward − the champion's must exceed ``cfg.min_improvement`` (with a
      separate ``eval.reward`` this is the verifier's reward: the verifier must improve). No champion
      yet: passed, value null.
    - ``length_drift``: |held-out length − baseline's| / baseline's ≤ ``cfg.max_length_drift``.
    - ``kl``: per-token KL to the reference on held-out prompts ≤ ``cfg.max_kl``.
    - ``reward_gap`` (only when the training reward is not the verifier): the gap training reward −
      verifier reward on the held-out completions, minus the baseline's gap, ≤
      ``cfg.max_reward_gap_widening``: the training reward may not run away from the verifier.

    ``cfg`` has those four attributes (``alignment.recipe.PromotionConfig``); a ``None`` limit turns
    its check off. ``candidate`` and ``baseline`` are eval metrics (``eval_reward``, ``eval_length``,
    ``eval_kl``, ``eval_train_reward``).
    """
    checks: dict[str, dict[str, Any]] = {}
    if champion_reward is None or champion_reward == float("-inf"):
        checks["improvement"] = {"value": None, "limit": cfg.min_improvement, "passed": True}
    else:
        gain = candidate["eval_reward"] - champion_reward
        checks["improvement"] = {"value": gain, "limit": cfg.min_improvement, "passed": gain > cfg.min_improvement}
    if cfg.max_length_drift is not None:
        base = baseline.get("eval_length") or 0.0
        drift = abs(candidate["eval_length"] - base) / base if base > 0 else (0.0 if candidate["eval_length"] == 0 else float("inf"))
        checks["length_drift"] = {"value": drift, "limit": cfg.max_length_drift, "passed": drift <= cfg.max_length_drift}
    if cfg.max_kl is not None:
        kl = candidate.get("eval_kl")
        checks["kl"] = {"value": kl, "limit": cfg.max_kl, "passed": kl is None or kl <= cfg.max_kl}
    if verifier_differs and cfg.max_reward_gap_widening is not None and "eval_train_reward" in candidate:
        gap = candidate["eval_train_reward"] - candidate["eval_reward"]
        base_gap = baseline["eval_train_reward"] - baseline["eval_reward"]
        widening = gap - base_gap
        checks["reward_gap"] = {"value": widening, "limit": cfg.max_reward_gap_widening,
                                "passed": widening <= cfg.max_reward_gap_widening}
    return checks


def blocked_by(checks: dict[str, dict[str, Any]]) -> list[str]:
    """The checks that failed, in ``CHECKS`` order (empty: the candidate may be promoted)."""
    return [name for name in CHECKS if name in checks and not checks[name]["passed"]]
