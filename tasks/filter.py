"""Improve's filter: choose tau for each Improve step and keep the samples that pass it; GRPO's groups: keep the
groups that carry a signal and store what each of their samples trains with."""

from __future__ import annotations

import polars as pl

from alignment import filters
from alignment.metrics import own
from alignment.recipe import FilterConfig
from tasks.context import RunRef, figure, flywheel_task, log, progress_lines, retry_on_io, where
from tasks.placement import run_once, run_stage
from tasks.results import Selection


def thresholds(ref: RunRef, scored_uri: str) -> list[float | None]:
    """One threshold per Improve step: tau_1 > V_pi and tau_{i+1} > tau_i for the ReST schedule.

    A plain call in the flow, not a task run of its own: a few milliseconds of arithmetic over the
    scored stage, which a task run would cost more than (bench/bench_orchestration.py)."""
    return run_stage(ref, "filter", compute_thresholds, scored_uri, label="thresholds")


def compute_thresholds(ref: RunRef, scored_uri: str) -> list[float | None]:
    """The body of ``thresholds``.

    V_pi is the policy's mean reward on its own samples (labelled rows excluded). Fixed and
    quantile filters use the same threshold every step; top-k has none (``None``).
    """
    cfg: FilterConfig = ref.recipe.filter
    steps = ref.recipe.improve.steps
    scored = ref.open_lake().read(scored_uri)
    if cfg.kind == "rest":
        policy_mean = own(scored)["reward"].mean()
        return filters.rest_thresholds(float(policy_mean or 0.0), float(scored["reward"].max() or 0.0), steps)
    if cfg.kind == "fixed":
        return [cfg.threshold] * steps
    if cfg.kind == "quantile":
        return [filters.quantile_threshold(scored, cfg.quantile)] * steps
    return [None] * steps


@flywheel_task(name="filter", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=retry_on_io)
def filter_stage(ref: RunRef, scored_uri: str, iteration: int, step: int, tau: float | None) -> Selection:
    """Commit ``filtered/step={i}``: the rows of ``scored`` that F(x, y; tau) keeps. Returns uri and counts."""
    lake, label = ref.open_lake(), where(iteration, step)
    uri = run_once(ref, ref.stage_uri(iteration, "filtered", step), "filter", write_filtered, scored_uri, iteration, step, tau, label=label)
    m = lake.manifest(uri)
    scored_rows = lake.manifest(scored_uri).rows
    dropped = lake.manifest_doc(uri).get("dropped", {})
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
    log().info("filter %s: tau=%s kept %d of %d%s", label, figure(tau), m.rows, scored_rows, f" (dropped: {why})" if why else "")
    return Selection(uri=uri, kept=m.rows, samples=scored_rows)


def write_filtered(ref: RunRef, scored_uri: str, iteration: int, step: int, tau: float | None) -> str:
    """The body of ``filter_stage``: dedupe, apply F(x, y; tau) (or top-k) and commit the stage."""
    cfg: FilterConfig = ref.recipe.filter
    lake, uri = ref.open_lake(), ref.stage_uri(iteration, "filtered", step)
    scored = lake.read(scored_uri)
    finished = scored if cfg.keep_truncated else filters.drop_truncated(scored)
    pool = filters.dedupe(finished) if cfg.dedupe else finished
    kept = filters.top_k(pool, cfg.k) if cfg.kind == "top_k" else filters.at_least(pool, tau)
    dropped = {
        "truncated": scored.height - finished.height,
        "duplicate": finished.height - pool.height,
        "below_threshold": pool.height - kept.height,
    }
    config = {"filter": cfg.model_dump(), "tau": tau, "step": step}
    # Why each scored row was kept or dropped, committed before the filtered stage that marks the step done.
    fates = filters.decisions(scored, finished, pool, kept, threshold=tau, top_k=cfg.kind == "top_k")
    lake.write_stage(ref.stage_uri(iteration, "decisions", step), [fates], config=config, parents=[scored_uri])
    lake.write_stage(uri, [kept], config=config, parents=[scored_uri], extra={"scored_rows": scored.height, "dropped": dropped})
    return uri


# -- GRPO: the step's groups, their advantages and stored log-probs ----------------------------------


@flywheel_task(name="groups", retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_on_io)
def group_stage(ref: RunRef, scored_uri: str, iteration: int, step: int, old_uri: str, reference_uri: str) -> Selection:
    """Commit ``groups/step={i}``: the step's informative groups with their advantages and the per-token log-probs
    of π_old (``old_uri``, which sampled them) and π_ref (``reference_uri``, when beta > 0). Returns uri and counts."""
    lake, label = ref.open_lake(), where(iteration, step)
    uri = run_once(ref, ref.stage_uri(iteration, "groups", step), "pair", write_groups, scored_uri, iteration, step,
                   old_uri, reference_uri, label=label)  # fmt: skip
    m, scored_rows = lake.manifest(uri), lake.manifest(scored_uri).rows
    dropped = lake.manifest_doc(uri).get("dropped", {})
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
    log().info("groups %s: kept %d of %d samples%s", label, m.rows, scored_rows, f" (dropped: {why})" if why else "")
    return Selection(uri=uri, kept=m.rows, samples=scored_rows)


def write_groups(ref: RunRef, scored_uri: str, iteration: int, step: int, old_uri: str, reference_uri: str) -> str:
    """The body of ``group_stage`` (a GPU stage, placed as ``pair``: the no-grad passes of π_old and π_ref).

    Drops truncated samples (unless ``filter.keep_truncated``) and then the groups whose rewards are all equal
    (``zero_std_group``, DAPO's dynamic sampling), records every scored row's fate in ``decisions/step={i}``,
    and stores each kept sample's ``advantage``, ``old_logps`` and ``ref_logps`` (null when beta is 0).
    """
    import torch

    from alignment import distributed, grpo
    from alignment.logprobs import token_logps
    from alignment.models import load_policy
    from alignment.train_settings import trainer_config

    recipe, lake, uri = ref.recipe, ref.open_lake(), ref.stage_uri(iteration, "groups", step)
    scored = lake.read(scored_uri)
    finished = scored if recipe.filter.keep_truncated else filters.drop_truncated(scored)
    kept = grpo.with_advantages(grpo.informative(finished), recipe.grpo.scale_rewards)
    cfg = trainer_config(recipe, "grpo", recipe.seed_for("grpo", iteration, step))
    prompts, completions = kept["prompt"].to_list(), kept["completion"].to_list()
    done = (kept["finish_reason"] != filters.TRUNCATED).to_list()

    def logps_under(model_uri: str) -> list[list[float]]:
        """Each kept sample's per-token log-probs under the model at ``model_uri``, without gradients."""
        if not kept.height:
            return []
        model, tokenizer = load_policy(ref.local_model(model_uri), trust_remote_code=recipe.model.trust_remote_code)
        values = distributed.map_rows(  # under a launch, each rank scores its block of samples
            lambda rows: token_logps(model, tokenizer, prompts[rows], completions[rows], done[rows], cfg.ref_batch_size,
                                     dtype=cfg.dtype, prompt=cfg.prompt),
            kept.height, cfg.strategy)  # fmt: skip
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next pass loads the other model
        return values

    reference = reference_uri if recipe.grpo.uses_reference else None  # beta = 0: no reference pass
    with progress_lines():
        old_logps = logps_under(old_uri)
        # A step that samples from the reference itself (an iteration's first) has π_ref = π_old: the same numbers.
        ref_logps = old_logps if reference == old_uri else logps_under(reference) if reference else [None] * kept.height
    kept = kept.with_columns(pl.Series("old_logps", old_logps, dtype=pl.List(pl.Float64)),
                             pl.Series("ref_logps", ref_logps, dtype=pl.List(pl.Float64)))  # fmt: skip
    if not distributed.world(cfg.strategy).main:
        return uri  # rank 0 writes the stage
    fates = filters.fates(scored, [("truncated", finished), ("zero_std_group", kept)], threshold=None)
    dropped = dict(sorted((r, int(n)) for r, n in fates.filter(pl.col("decision") == "dropped")["reason"].value_counts().iter_rows()))
    config = {"grpo": recipe.grpo.model_dump(), "filter": {"keep_truncated": recipe.filter.keep_truncated}, "step": step,
              "old": old_uri, "reference": reference}  # fmt: skip
    lake.write_stage(ref.stage_uri(iteration, "decisions", step), [fates], config=config, parents=[scored_uri])
    lake.write_stage(uri, [kept], config=config, parents=[scored_uri, old_uri, *([reference] if reference else [])],
                     extra={"scored_rows": scored.height, "dropped": dropped, "groups": kept["prompt_id"].n_unique(),
                            "figures": grpo.sample_figures(scored)})
    return uri
