"""Held-out evaluation: greedy decoding, mean reward and accuracy ("reward on D_eval").

Accuracy is the share of prompts whose reward is at least 1 — exact for the verifiers (exact match,
numeric match, regex match), and the reward's own notion of "correct" for any reward in [0, 1];
for a reward on another scale (a reward model) read ``eval_reward`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from alignment.rewards import RewardFn, score
from alignment.samplers import Sampler, SamplingParams

CORRECT = 1.0


def score_heldout(
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
    n_tokens = [c[0] for c in gen.num_tokens] if gen.num_tokens else [0] * len(completions)
    reasons = [c[0] for c in gen.finish_reasons] if gen.finish_reasons else ["stop"] * len(completions)
    frame = pl.DataFrame(
        {
            "prompt_id": list(prompt_ids),
            "prompt": list(prompts),
            "reference": list(references),
            "completion": completions,
            "reward": rewards,
            "correct": [r >= CORRECT for r in rewards],
            "num_tokens": n_tokens,
            "finish_reason": reasons,
        },
        schema_overrides={"prompt_id": pl.Int64, "num_tokens": pl.Int32},
    )
    n = max(1, frame.height)
    metrics = {
        "eval_reward": sum(rewards) / n,
        "eval_accuracy": frame["correct"].sum() / n,
        "eval_length": sum(n_tokens) / n,
        "eval_truncated": reasons.count("length") / n,
    }
    return frame, metrics
