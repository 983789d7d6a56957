"""Score: annotate D_g with the reward R(x, y) (ReST Algorithm 1, "Annotate D_g").

Scoring is sharded like Grow: one ``score-shard`` task per part of the ``samples`` stage (one part
per Grow shard, plus the labelled data), mapped over the flow's task runner so a Ray cluster scores
the parts in parallel; the ``scored`` stage is committed once, after every part is written. Its
rows are those of ``samples`` in the same order, whatever the shard count or runner.
"""

from __future__ import annotations

import polars as pl
from prefect import unmapped

from alignment.metrics import is_policy_sample
from alignment.rewards import resolve_reward_spec, with_timeout
from alignment.rewards import score as call_reward
from tasks.context import RunRef, figure, flywheel_task, io_retries, log, progress_lines, retry_on_io, where
from tasks.gpu import MODEL_LOAD_LOCK
from tasks.placement import run_sharded, run_stage


@flywheel_task(name="score-shard", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=retry_on_io)
def score_shard(ref: RunRef, samples_uri: str, iteration: int, part: str, shard: int, step: int | None = None) -> dict:
    """Add a ``reward`` column to one part of ``samples`` and write it as part ``shard`` of ``scored``."""
    return run_stage(ref, "score", score_part, samples_uri, iteration, part, shard, step,
                     label=f"{where(iteration, step)} part {shard + 1}")


def score_part(ref: RunRef, samples_uri: str, iteration: int, part: str, shard: int, step: int | None = None) -> dict:
    """The body of ``score_shard``: a plain module-level function (Ray pickles it by reference; a CPU or GPU worker can run it).

    A GPU stage when ``orchestration.score_on_gpu`` says the reward is a model on the GPU.
    """
    lake, uri = ref.open_lake(), ref.stage_uri(iteration, "scored", step)
    samples = lake.read_part(samples_uri, part)  # verified against the manifest
    with MODEL_LOAD_LOCK:  # a reward model loads like a policy: one at a time per process
        reward = with_timeout(resolve_reward_spec(ref.recipe.reward), ref.recipe.reward_timeout_s)
    # Labelled demonstrations without a reference are not the reward's to judge: their reward stays null.
    judged = samples.with_row_index("_row").filter(is_policy_sample() | pl.col("reference").is_not_null())
    with progress_lines():  # a reward model over a large part says how far it is
        rewards = call_reward(reward, judged["prompt"].to_list(), judged["completion"].to_list(), judged["reference"].to_list())
    values: list[float | None] = [None] * samples.height
    for row, r in zip(judged["_row"].to_list(), rewards, strict=True):
        values[row] = r
    scored = samples.with_columns(pl.Series("reward", values, dtype=pl.Float64))
    judged_rows, unjudged = judged.height, scored.height - judged.height
    if judged_rows == 0:  # the labelled part: demonstrations, not the reward's to judge
        log().info("score %s part %s: %d labelled demonstrations, not scored (no reference)", where(iteration, step), part, scored.height)
    else:
        also = f" ({unjudged} labelled demonstrations not scored)" if unjudged else ""
        log().info("score %s part %s: %d rows, mean reward %s%s", where(iteration, step), part, judged_rows,
                   figure(scored["reward"].mean()), also)
    return lake.write_part(uri, shard, scored)


@io_retries(2, 5)
def commit_scored(ref: RunRef, samples_uri: str, iteration: int, parts: list[dict], step: int | None = None) -> str:
    """Verify the parts and commit the ``scored`` stage (a plain call, as ``tasks.grow.commit_samples`` is)."""
    lake, uri = ref.open_lake(), ref.stage_uri(iteration, "scored", step)
    manifest = lake.commit(uri, sorted(parts, key=lambda p: p["name"]), config={"reward": ref.recipe.reward}, parents=[samples_uri])
    log().info("score %s: committed %d rows in %d part%s", where(iteration, step), manifest.rows, len(parts), "" if len(parts) == 1 else "s")
    return manifest.uri


def score(ref: RunRef, samples_uri: str, iteration: int, step: int | None = None) -> str:
    """Score every part of ``samples`` (sharded) and return the ``scored`` stage URI; a committed stage is reused.
    A failed shard (a broken reward) leaves no half-scored stage behind. ``step``: a GRPO step's samples."""

    def submit():
        names = [f["name"] for f in ref.open_lake().manifest(samples_uri).files]
        return score_shard.map(unmapped(ref), unmapped(samples_uri), unmapped(iteration), names, range(len(names)),
                               unmapped(step))

    return run_sharded(ref, ref.stage_uri(iteration, "scored", step), "score", submit,
                       lambda parts: commit_scored(ref, samples_uri, iteration, parts, step))
