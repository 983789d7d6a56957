"""ReST (Reinforced Self-Training) as a Prefect flow — Algorithm 1 of the ReST paper (seed notes 004).

Run it on a laptop (embedded Prefect, SQLite MLflow, a local lake)::

    flywheel run recipes/arithmetic-rest.yaml

On GPU workers, set ``grow.sampler: vllm`` and ``grow.shards`` in the recipe and serve it with
``flywheel serve`` so Grow and training land on the GPU pool (see infra/prefect.yaml).

Where this departs from the paper: the thresholds ``tau_i`` are spread evenly between the policy's
mean reward and the best reward seen (any schedule with ``tau_1 > V_pi`` and ``tau_{i+1} > tau_i``
satisfies Algorithm 1); "while reward improves on D_eval" is applied per Improve step — a step whose
held-out reward does not beat the best so far is not adopted, and ``eval.patience`` such steps end
the run. ``improve.restart_from_base`` gives ReST-EM, fine-tuning the warm-started policy each time.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alignment.recipe import Recipe
from flows.common import open_run, warm_start_and_baseline
from tasks.report.artifacts import publish_iteration
from tasks.evaluate import evaluate
from tasks.filter import filter_stage, thresholds
from tasks.grow import grow
from tasks.inputs import prepare_inputs
from tasks.tracking.registry import log_step_metrics, register, tracked
from tasks.report.summary import Summary
from tasks.score import score
from tasks.step_metrics import Stopwatch, step_metrics
from tasks.train import improve, train_metrics


@flow(name="rest", log_prints=True, validate_parameters=True)
def rest(recipe: Recipe, run_name: str | None = None) -> dict[str, Any]:
    """Grow a dataset from the policy, filter it with a rising threshold, fine-tune, repeat.

    Args:
        recipe: The experiment: task, model, reward, loop settings, lake and MLflow (recipes/*.yaml).
        run_name: Name of the run in the lake and MLflow; re-using a name resumes that run.
    """
    ref = open_run(recipe, run_name)
    with tracked(ref):  # the MLflow runs end FINISHED, FAILED or KILLED with the flow
        summary = Summary(ref, "rest")
        inputs = prepare_inputs(ref)

        # Train pi_theta on D (behaviour cloning), and measure where we start.
        policy, best, versions = warm_start_and_baseline(ref, inputs, summary)
        base, stale = policy, 0
        champion_eval, clock = ref.stage_uri(0, "eval", 0), Stopwatch()  # win rates are against the champion's answers

        for g in range(1, recipe.grow_steps + 1):
            # Grow: D_g = samples of pi_theta, annotated with R(x, y).
            samples = clock("grow", grow, ref, policy, g)
            scored = clock("score", score, ref, samples, g)
            for i, tau in enumerate(thresholds(ref, scored), start=1):
                # Improve: keep F(x, y; tau_i) and fine-tune on it.
                kept = clock("filter", filter_stage, ref, scored, g, i, tau)
                if kept.kept == 0:
                    summary.step(g, i, kept, None, None, tau=tau, skipped="filter kept no rows")
                    print(f"iteration {g} step {i}: the filter (tau={tau}) kept no rows; skipping this Improve step")
                    continue
                start = base if recipe.improve.restart_from_base else policy
                candidate = clock("train", improve, ref, start, kept.uri, g, i)
                metrics = clock("evaluate", evaluate, ref, candidate, g, i)
                datasets = [kept.uri, ref.stage_uri(g, "eval", i)]
                extra = step_metrics(ref, scored, kept.uri, datasets[1], champion_eval, clock.seconds)
                reg = clock("register", register, ref, candidate, metrics, g, i, datasets, parent_version=versions[start],
                            step_metrics={"tau": tau or 0.0, "kept": kept.kept, **train_metrics(ref, candidate), **extra})
                log_step_metrics(ref, g, i, {"seconds_register": clock.seconds["seconds_register"]})
                versions[candidate] = reg.model_version
                summary.step(g, i, kept, metrics, reg, tau=tau, **extra, seconds_register=clock.seconds["seconds_register"])
                publish_iteration(ref, g, scored, kept.uri)
                champion_eval = datasets[1] if reg.promoted else champion_eval
                # while reward improves on D_eval (and the promotion guards hold: a hacked step is not built on)
                if metrics["eval_reward"] > best and not set(reg.blocked_by) - {"improvement"}:
                    policy, best, stale = candidate, metrics["eval_reward"], 0
                else:
                    stale += 1
                if stale >= recipe.eval.patience:
                    return summary.stop(f"held-out reward did not improve for {stale} Improve step(s)")
        return summary.stop("completed all Grow steps")
