"""Opening a run: its name, its lake, its cache and its MLflow parent run, as one ``RunRef``.

Opening checks what keeps the run whole (``tasks.lake.runs``): its name and model name are safe, this
process holds the run's lease (one writer per run), and the recipe is the one the run was created
with. ``flywheel run`` makes the same checks before Prefect starts (``flows.run.run_recipe``); a run
started from a deployment makes them here.
"""

from __future__ import annotations

import atexit

from alignment.recipe import Recipe
from tasks.context import RunRef, local_cache_dir
from tasks.evaluate import evaluate
from tasks.placement import check_stage_deployments
from tasks.tracking.registry import register, start_tracking
from tasks.report.summary import Summary
from tasks.lake import default_run_name, guard_run, release
from tasks.train import warm_start


def open_run(recipe: Recipe, run_name: str | None) -> RunRef:
    """A reference to the run named ``run_name`` (re-using it resumes the run)."""
    check_stage_deployments(recipe)  # a run triggered from a deployment did not pass through run_recipe
    run = run_name or default_run_name(recipe)
    lake, taken = guard_run(recipe, run)
    if taken:  # a deployment's flow run: its process ends with the flow, and the lease with it
        atexit.register(release, lake.uri, run)
    ref = RunRef(run=run, lake=lake.uri, recipe=recipe, cache_dir=local_cache_dir())
    return ref.model_copy(update={"mlflow_run_id": start_tracking(ref)})


def close_run(ref: RunRef) -> None:
    """Release the run's lease now (the flow has finished); without it, the process's exit releases it."""
    release(ref.lake, ref.run)


def warm_start_and_baseline(ref: RunRef, inputs: dict[str, str], summary: Summary) -> tuple[str, float, dict[str, str]]:
    """Algorithm 1's "Train pi_theta on D", then measure and register where the run starts.

    Returns the starting policy, its held-out reward, and ``{checkpoint: model version}``.
    """
    policy = warm_start(ref, inputs["base"]) if ref.recipe.warm_start.enabled else inputs["base"]
    metrics = evaluate(ref, policy, 0, 0)
    reg = register(ref, policy, metrics, 0, 0, [inputs["labelled"], ref.stage_uri(0, "eval", 0)])
    summary.baseline(metrics, reg)
    return policy, metrics["eval_reward"], {policy: reg.model_version}
