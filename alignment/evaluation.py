"""Held-out evaluation: greedy decoding, mean reward and exact match ("reward on D_eval")."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from alignment.rewards import RewardFn, score
from alignment.samplers import Sampler, SamplingParams


def evaluate(
    sampler: Sampler,
    prompt_ids: Sequence[int],
    prompts: Sequence[str],
    references: Sequence[str],
    reward: RewardFn,
    *,
    max_new_tokens: int,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Greedy completions for every held-out prompt, their rewards, and the summary metrics."""
    gen = sampler.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), prompt_ids)
    completions = [c[0] for c in gen.completions]
    rewards = score(reward, prompts, completions, references)
    frame = pl.DataFrame(
        {
            "prompt_id": list(prompt_ids),
            "prompt": list(prompts),
            "reference": list(references),
            "completion": completions,
            "reward": rewards,
            "exact_match": [c.strip() == r.strip() for c, r in zip(completions, references, strict=True)],
        },
        schema_overrides={"prompt_id": pl.Int64},
    )
    n = max(1, frame.height)
    metrics = {"eval_reward": sum(rewards) / n, "eval_accuracy": frame["exact_match"].sum() / n}
    return frame, metrics
