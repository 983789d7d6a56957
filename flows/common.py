"""Opening a run: its name, its lake, its cache and its MLflow parent run, as one ``RunRef``."""

from __future__ import annotations

import time

from alignment.recipe import Recipe
from tasks.context import RunRef, local_cache_dir
from tasks.evaluate import evaluate
from tasks.placement import check_stage_deployments
from tasks.register import register, start_tracking
from tasks.report import Summary
from tasks.train import warm_start
from tasks.storage import normalize_uri


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run(recipe: Recipe, run_name: str | None) -> RunRef:
    """A reference to the run named ``run_name`` (re-using it resumes the run)."""
    check_stage_deployments(recipe)  # a run triggered from a deployment did not pass through run_recipe
    run = run_name or default_run_name(recipe)
    ref = RunRef(run=run, lake=normalize_uri(recipe.lake), recipe=recipe, cache_dir=local_cache_dir())
    return ref.model_copy(update={"mlflow_run_id": start_tracking(ref)})


def warm_start_and_baseline(ref: RunRef, inputs: dict[str, str], summary: Summary) -> tuple[str, float, dict[str, str]]:
    """Algorithm 1's "Train pi_theta on D", then measure and register where the run starts.

    Returns the starting policy, its held-out reward, and ``{checkpoint: model version}``.
    """
    policy = warm_start(ref, inputs["base"]) if ref.recipe.warm_start.enabled else inputs["base"]
    metrics = evaluate(ref, policy, 0, 0)
    reg = register(ref, policy, metrics, 0, 0, [inputs["labelled"], ref.stage(0, "eval", 0)])
    summary.baseline(metrics, reg)
    return policy, metrics["eval_reward"], {policy: reg["model_version"]}
