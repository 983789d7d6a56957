"""Improve's filter: choose tau for each Improve step and keep the samples that pass it."""

from __future__ import annotations

from alignment import filters
from alignment.metrics import own
from alignment.recipe import FilterConfig
from tasks.context import RunRef, flywheel_task, log, retry_on_io
from tasks.placement import run_once, run_stage
from tasks.results import Selection


@flywheel_task(name="thresholds")
def thresholds(ref: RunRef, scored_uri: str) -> list[float | None]:
    """One threshold per Improve step: tau_1 > V_pi and tau_{i+1} > tau_i for the ReST schedule."""
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
    lake, label = ref.open_lake(), f"g={iteration} step {step}"
    uri = run_once(ref, ref.stage_uri(iteration, "filtered", step), "filter", write_filtered, scored_uri, iteration, step, tau, label=label)
    m = lake.manifest(uri)
    scored_rows = lake.manifest(scored_uri).rows
    dropped = lake.manifest_doc(uri).get("dropped", {})
    why = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
    log().info("filter g=%d step %d: tau=%s kept %d of %d%s", iteration, step, tau, m.rows, scored_rows, f" (dropped: {why})" if why else "")
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
