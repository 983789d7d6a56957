"""Grow: sample N completions per prompt from the current policy (ReST Algorithm 1, "Generate D_g").

Prompts are split into ``grow.shards`` shards, each a task of its own so a distributed task
runner can place them on different workers; every shard writes one part of the ``samples``
stage and the stage is committed once all parts exist. Samples are seeded per (prompt, index),
so the dataset is the same whatever the shard count, runner or batch size. A GRPO step (``step``)
samples its own batch of prompts into ``samples/step={i}`` (``alignment.grpo.prompt_batch``).
"""

from __future__ import annotations

import os

import polars as pl
from prefect import unmapped

from alignment.metrics import length_stats
from alignment.samplers import SamplingParams, make_sampler, sampler_options
from tasks.context import RunRef, flywheel_task, io_retries, log, progress_lines, retry_on_io, warn_truncated, where
from tasks.gpu import MODEL_LOAD_LOCK
from tasks.placement import run_sharded, run_stage

SAMPLE_SCHEMA = {
    "prompt_id": pl.Int64,
    "prompt": pl.Utf8,
    "reference": pl.Utf8,
    "completion": pl.Utf8,
    "sample_idx": pl.Int32,
    "policy_version": pl.Utf8,
    "num_tokens": pl.Int32,
    "finish_reason": pl.Utf8,
}


@flywheel_task(name="grow-shard", retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_on_io)
def grow_shard(ref: RunRef, model_uri: str, iteration: int, shard: int, shards: int, step: int | None = None) -> dict:
    """Sample one shard of the prompts and write it as one part of the ``samples`` stage (a GPU stage)."""
    return run_stage(ref, "grow", sample_shard, model_uri, iteration, shard, shards, step,
                     label=f"{where(iteration, step)} shard {shard + 1}/{shards}")


def sample_shard(ref: RunRef, model_uri: str, iteration: int, shard: int, shards: int, step: int | None = None) -> dict:
    """The body of ``grow_shard``: a plain function, so it can run in a fresh process or on a GPU worker."""
    recipe, lake = ref.recipe, ref.open_lake()
    uri = ref.stage_uri(iteration, "samples", step)
    prompts = lake.read(ref.stage_uri(0, "prompts")).sort("prompt_id")
    seed = recipe.seed_for("grow", iteration) if step is None else recipe.seed_for("grpo", iteration, step)
    if step is not None:  # a GRPO step's batch D_b
        from alignment.grpo import prompt_batch

        prompts = prompts.filter(pl.col("prompt_id").is_in(prompt_batch(prompts["prompt_id"], recipe.grpo.prompts_per_step, seed)))
    part = prompts.filter(pl.int_range(pl.len()) % shards == shard)
    g = recipe.grow
    with MODEL_LOAD_LOCK:  # shards on the thread runner load their models one at a time
        sampler = make_sampler(g.sampler, ref.local_model(model_uri), **sampler_options(recipe, g.batch_size))
    params = SamplingParams(g.temperature, g.top_p, g.max_new_tokens, seed=seed)
    with progress_lines():
        gen = sampler.generate(part["prompt"].to_list(), g.samples_per_prompt, params, part["prompt_id"].to_list())
    n = g.samples_per_prompt
    frame = pl.DataFrame(
        {
            "prompt_id": [pid for pid in part["prompt_id"] for _ in range(n)],
            "prompt": [p for p in part["prompt"] for _ in range(n)],
            "reference": [r for r in part["reference"] for _ in range(n)],
            "completion": [c for row in gen.completions for c in row],
            "sample_idx": [j for _ in range(part.height) for j in range(n)],
            "policy_version": ref.policy_version(model_uri),
            "num_tokens": [t for row in gen.num_tokens for t in row],
            "finish_reason": [f for row in gen.finish_reasons for f in row],
        },
        schema=SAMPLE_SCHEMA,
    )
    device = f" on GPU {os.environ['CUDA_VISIBLE_DEVICES']}" if os.environ.get("CUDA_VISIBLE_DEVICES") else ""
    log().info("grow %s shard %d/%d%s: %d prompts -> %d samples", where(iteration, step), shard + 1, shards, device, part.height,
               frame.height)
    return lake.write_part(uri, shard, frame)


@io_retries(2, 5)
def commit_samples(ref: RunRef, model_uri: str, iteration: int, parts: list[dict], step: int | None = None) -> str:
    """Add the labelled data D when the recipe asks (D_g = samples ∪ D) and commit the stage.

    A plain call once every shard has written its part, not a task run of its own: a commit is a few
    small writes, retried here on I/O failure as the shard tasks are by Prefect."""
    lake, uri = ref.open_lake(), ref.stage_uri(iteration, "samples", step)
    parts = sorted(parts, key=lambda p: p["name"])
    if ref.recipe.grow.include_labelled:
        labelled = lake.read(ref.stage_uri(0, "labelled"))
        if labelled.height:
            frame = labelled.select(
                "prompt_id", "prompt", "reference", "completion",
                pl.lit(-1, pl.Int32).alias("sample_idx"), pl.lit("labelled").alias("policy_version"),
                pl.lit(0, pl.Int32).alias("num_tokens"), pl.lit("stop").alias("finish_reason"),
            ).cast(SAMPLE_SCHEMA)
            parts.append(lake.write_part(uri, len(parts), frame))
    config = {"grow": ref.recipe.grow.model_dump(), "seed": ref.recipe.seed, "model": model_uri}
    return lake.commit(uri, parts, config=config, parents=[model_uri, ref.stage_uri(0, "prompts")]).uri


def grow(ref: RunRef, model_uri: str, iteration: int, step: int | None = None) -> str:
    """Run the Grow step (sharded) and return the ``samples`` stage URI; a committed stage is reused.
    ``step``: a GRPO step, which samples its own batch of prompts into ``samples/step={step}``."""
    shards = ref.recipe.grow.shards
    uri = run_sharded(
        ref, ref.stage_uri(iteration, "samples", step), "grow",
        lambda: grow_shard.map(unmapped(ref), unmapped(model_uri), unmapped(iteration), range(shards), unmapped(shards),
                               unmapped(step)),
        lambda parts: commit_samples(ref, model_uri, iteration, parts, step),
    )
    grown = ref.open_lake().read(uri).select("sample_idx", "num_tokens", "finish_reason")
    warn_truncated(f"grow {where(iteration, step)}", length_stats(grown, "grown")["grown_truncated"],
                   "samples", "grow.max_new_tokens", ref.recipe.grow.max_new_tokens)
    return uri
