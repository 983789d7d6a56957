"""Score: annotate D_g with the reward R(x, y) (ReST Algorithm 1, "Annotate D_g")."""

from __future__ import annotations

import polars as pl
from prefect import task

from alignment.reward_model import resolve_reward_spec
from alignment.rewards import score as call_reward
from tasks.context import RunRef, log


@task(name="score", retries=2, retry_delay_seconds=[2, 5])
def score(ref: RunRef, samples_uri: str, iteration: int) -> str:
    """Add a ``reward`` column to every sample and commit the ``scored`` stage."""
    lake, uri = ref.open_lake(), ref.stage(iteration, "scored")
    if lake.is_done(uri):
        return uri
    reward = resolve_reward_spec(ref.recipe.reward)
    samples = lake.read(samples_uri)
    rewards = call_reward(reward, samples["prompt"].to_list(), samples["completion"].to_list(), samples["reference"].to_list())
    scored = samples.with_columns(pl.Series("reward", rewards, dtype=pl.Float64))
    log().info("score g=%d: %d rows, mean reward %.3f", iteration, scored.height, scored["reward"].mean() or 0.0)
    return lake.write_stage(uri, [scored], config={"reward": ref.recipe.reward}, parents=[samples_uri]).uri
