"""What a person looks at after each iteration: Prefect artifacts in the UI and plots in MLflow.

``publish_iteration`` runs at the end of every iteration of both loops and publishes, from the
lake alone (so a resumed run publishes exactly what an uninterrupted one would):

- Prefect artifacts keyed ``{run}-iteration-{g}-{what}`` (lowercase letters, digits and dashes:
  Prefect's rule for keys; a new version per call, the UI shows the latest):
  ``rewards`` a table of reward statistics per stage, ``lake`` a link to the iteration's prefix in
  the lake (``s3://...`` or ``file://...``), ``samples`` markdown with kept and dropped rows;
- two PNG plots on the parent MLflow run, overwritten as the run goes:
  ``plots/reward_distribution.png`` (the policy's own samples' rewards, one curve per iteration) and
  ``plots/heldout_reward.png`` (held-out reward and accuracy after every Improve step, from
  ``summary.json``).

Nothing here holds credentials: links and tables carry lake URIs and numbers only.
"""

from __future__ import annotations

import re
from typing import Any

import polars as pl

from alignment.metrics import describe, is_policy_sample, own
from tasks.context import RunRef, flywheel_task, log
from tasks.report import plots

SAMPLE_COLUMNS = ["prompt_id", "sample_idx", "prompt", "completion", "reference", "reward"]
PAIR_COLUMNS = ["prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"]
REWARD_PLOT = "plots/reward_distribution.png"
HELDOUT_PLOT = "plots/heldout_reward.png"


def artifact_key(run: str, iteration: int, what: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{run}-iteration-{iteration}-{what}".lower()).strip("-")
    return re.sub(r"-{2,}", "-", slug)


@flywheel_task(name="publish-iteration", retries=2, retry_delay_seconds=[2, 5])
def publish_iteration(ref: RunRef, iteration: int, scored_uri: str, kept_uri: str) -> dict[str, str]:
    """Publish iteration ``iteration``'s artifacts and refresh the run's plots; returns the artifact keys.

    ``kept_uri`` is what training used: a ``filtered/step={i}`` stage (ReST) or the ``pairs`` stage
    (iterative DPO); rows of ``scored_uri`` it does not use are the dropped ones.
    """
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    lake = ref.open_lake()
    scored, kept = lake.read(scored_uri), lake.read(kept_uri)
    keys = {what: artifact_key(ref.run, iteration, what) for what in ("rewards", "lake", "samples")}
    create_table_artifact(
        table=reward_table(ref, iteration, scored, kept, kept_uri), key=keys["rewards"],
        description=f"Reward statistics of iteration {iteration} of run {ref.run}.",
    )
    create_link_artifact(
        link=scored_uri, link_text=scored_uri, key=keys["lake"],
        description=f"The scored rows of iteration {iteration}: one partition of the `scored` table (hive-partitioned "
                    f"Parquet by run and iteration; the other stages are the sibling tables, e.g. `{lake.address(kept_uri).name}`).",
    )
    create_markdown_artifact(markdown=samples_markdown(scored, kept, lake.address(kept_uri).label), key=keys["samples"],
                             description=f"Selection and dropped rows of iteration {iteration}.")
    log_plots(ref, iteration)
    prefix = artifact_key(ref.run, iteration, "")  # the run's and iteration's part of each key
    log().info("published artifacts %s-{%s} and plots for iteration %d", prefix, ",".join(keys), iteration)
    return keys


# -- the table --------------------------------------------------------------------------------
def _stats(stage: str, rewards: pl.Series) -> dict[str, Any]:
    d = describe(rewards)
    if d["count"] == 0:
        return {"stage": stage, "rows": 0, "mean": None, "std": None, "min": None, "p50": None, "max": None, "positive": None}
    return {
        "stage": stage, "rows": d["count"], "mean": round(d["mean"], 4), "std": round(d["std"] or 0.0, 4),
        "min": d["min"], "p50": d["p50"], "max": d["max"], "positive": round(d["positive"], 4),
    }


def reward_table(ref: RunRef, iteration: int, scored: pl.DataFrame, kept: pl.DataFrame, kept_uri: str) -> list[dict]:
    """One row per stage: everything scored, the policy's own samples, what was kept, held-out eval."""
    rows = [_stats("scored", scored["reward"])]
    if "sample_idx" in scored.columns:
        rows.append(_stats("scored (policy samples)", own(scored)["reward"]))
    name = ref.open_lake().address(kept_uri).label
    if "reward" in kept.columns:
        rows.append(_stats(name, kept["reward"]))
    elif "chosen_reward" in kept.columns:
        rows += [_stats(f"{name} (chosen)", kept["chosen_reward"]), _stats(f"{name} (rejected)", kept["rejected_reward"])]
    lake = ref.open_lake()
    for step in range(0, ref.recipe.improve.steps + 1):
        uri = ref.stage_uri(iteration, "eval", step)
        if lake.is_done(uri):
            rows.append(_stats(f"eval/step={step}", lake.read(uri)["reward"]))
    return rows


# -- the markdown -----------------------------------------------------------------------------
def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:120]


def _markdown_table(frame: pl.DataFrame) -> str:
    if frame.height == 0:
        return "_none_"
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([head, rule, *body])


def samples_markdown(scored: pl.DataFrame, kept: pl.DataFrame, kept_label: str, limit: int = 10) -> str:
    """Up to ``limit`` kept rows and the ``limit`` best-rewarded dropped rows, as markdown tables."""
    if "chosen" in kept.columns:  # pairs: a sample is used when it is the chosen or rejected side of a pair
        used = pl.concat([
            kept.select("prompt_id", pl.col("chosen_idx").alias("sample_idx")),
            kept.select("prompt_id", pl.col("rejected_idx").alias("sample_idx")),
        ]).unique()
        shown = kept.select([c for c in PAIR_COLUMNS if c in kept.columns])
    else:
        used = kept.select("prompt_id", "sample_idx")
        own_first = kept.sort(~is_policy_sample(), "prompt_id", "sample_idx")  # labelled rows (-1) last
        shown = own_first.select([c for c in SAMPLE_COLUMNS if c in kept.columns])
    dropped = scored.join(used.cast({"sample_idx": scored["sample_idx"].dtype}), on=["prompt_id", "sample_idx"], how="anti")
    dropped = dropped.sort("reward", "prompt_id", "sample_idx", descending=[True, False, False])
    return "\n".join([
        f"### Selection: {kept.height} rows of `{kept_label}` (of {scored.height} scored)",
        _markdown_table(shown.head(limit)),
        "",
        f"### Dropped: {dropped.height} scored rows, best reward first",
        _markdown_table(dropped.select([c for c in SAMPLE_COLUMNS if c in dropped.columns]).head(limit)),
    ])


# -- the plots --------------------------------------------------------------------------------
def log_plots(ref: RunRef, iteration: int) -> None:
    """Draw both plots from the lake and log them to the parent MLflow run (replacing the previous ones)."""
    from mlflow import MlflowClient

    from tasks.tracking.registry import configure

    if not ref.mlflow_run_id:
        return
    configure(ref)
    client = MlflowClient()
    for path, figure in ((REWARD_PLOT, reward_figure(ref, iteration)), (HELDOUT_PLOT, heldout_figure(ref))):
        client.log_figure(ref.mlflow_run_id, figure, path)


def reward_figure(ref: RunRef, last: int):
    """The reward of the policy's own samples, one step histogram per iteration committed so far."""
    lake = ref.open_lake()
    scored = {g: ref.stage_uri(g, "scored") for g in range(1, last + 1)}
    per_iteration = {g: plots.own_rewards(lake.read(uri)) for g, uri in scored.items() if lake.is_done(uri)}
    fig, ax = plots.figure(7, 4, title=f"Reward of sampled completions per iteration ({ref.run})", xlabel="reward",
                           ylabel="share of samples", grid=True, constrained=True)
    series = {f"iteration {g} (mean {v.mean():.3f})": v for g, v in per_iteration.items() if len(v)}
    if series:
        plots.histograms(ax, series, shares=True, common_range=True, histtype="step", linewidth=1.5)
        ax.legend(loc="best", fontsize="small")
    return fig


def heldout_figure(ref: RunRef):
    """Held-out reward and accuracy after the warm start and every Improve step, from ``summary.json``."""
    lake = ref.open_lake()
    uri = f"{lake.run_uri(ref.run)}/summary.json"
    points = plots.steps(lake.get_json(uri) if lake.store.exists(uri) else {})
    fig, ax = plots.figure(7, 4, title=f"Held-out reward per Improve step ({ref.run})", xlabel="iteration.step",
                           ylabel="held-out score", grid=True, constrained=True)
    if points:
        plots.lines(ax, points, {"eval_reward": "reward", "eval_accuracy": "accuracy (reward ≥ 1)"},
                    {"eval_accuracy": {"marker": "x", "linestyle": "--"}})
        ax.legend(loc="best", fontsize="small")
    return fig
