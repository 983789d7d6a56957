"""Held-out evaluation: greedy decoding, mean reward and accuracy ("reward on D_eval").

Accuracy is the share of prompts whose reward is at least 1 — exact for the verifiers (exact match,
numeric match, regex match), and the reward's own notion of "correct" for any reward in [0, 1];
for a reward on another scale (a reward model) read ``eval_reward`` instead.

Each row keeps the ids the policy was given and generated and the generated ids' log-probs under it,
taken from the passes that generated them (``prompt_token_ids``, ``token_ids``, ``token_logps``), so a
KL to another policy needs only that policy's pass over the same ids (``completion_logps``). Eval tables
written before these columns existed lack them; nothing reads them back from the lake.
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
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, logprobs=True)
    gen = sampler.generate(prompts, 1, params, prompt_ids)
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
    if gen.token_logps:  # a sampler that cannot give them leaves them out
        frame = frame.with_columns(
            pl.Series("prompt_token_ids", gen.prompt_token_ids, dtype=pl.List(pl.Int32)),
            pl.Series("token_ids", [c[0] for c in gen.token_ids], dtype=pl.List(pl.Int32)),
            pl.Series("token_logps", [c[0] for c in gen.token_logps], dtype=pl.List(pl.Float32)),
        )
    n = max(1, frame.height)
    metrics = {
        "eval_reward": sum(rewards) / n,
        "eval_accuracy": frame["correct"].sum() / n,
        "eval_length": sum(n_tokens) / n,
        "eval_truncated": reasons.count("length") / n,
    }
    return frame, metrics


def completion_logps(model, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *, pad_id: int,
                     batch_size: int, dtype: str = "float32") -> list[float]:
    """``log π(completion | prompt)`` under ``model`` for each pair of id lists, summed over the completion's ids
    as given (no end id added): the teacher-forced twin of a sampler's ``token_logps``."""
    import torch

    from alignment.logprobs import batch_logps
    from alignment.progress import Ticker
    from alignment.training import IGNORE, autocast, collate

    examples = [(p + c, [IGNORE] * len(p) + c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    was_training = model.training
    model.eval()
    out: list[float] = []
    tick = Ticker(len(examples), "completions scored")
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = {k: v.to(model.device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
                with autocast(model.device, dtype):
                    out += batch_logps(model, batch)[0].tolist()
                tick(len(out))
    finally:
        model.train(was_training)
    return out
