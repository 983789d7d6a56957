"""ReST (Reinforced Self-Training) as a Prefect flow: Algorithm 1 of Gulcehre et al., "Reinforced
Self-Training (ReST) for Language Modeling", arXiv 2308.08998.

Run it on a laptop (embedded Prefect, SQLite MLflow, a local lake)::

    flywheel run recipes/arithmetic-rest.yaml

On GPU workers, set ``grow.sampler: vllm`` and ``grow.shards`` in the recipe and serve it with
``flywheel serve`` so Grow and training land on the GPU pool (see infra/prefect.yaml).

Where this departs from the paper: the thresholds ``tau_i`` are spread evenly between the policy's
mean reward and the best reward seen (any schedule with ``tau_1 > V_pi`` and ``tau_{i+1} > tau_i``
satisfies Algorithm 1); "while reward improves on D_eval" is applied per Improve step — a step whose
held-out reward does not beat the best so far is not adopted, and ``eval.patience`` such steps end
the run. ``improve.restart_from_base`` gives ReST-EM (Singh et al., arXiv 2312.06585), fine-tuning
the warm-started policy each time.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alignment.recipe import Recipe
from flows.loop import open_loop
from tasks.context import figure
from tasks.evaluate import evaluate
from tasks.filter import filter_stage, thresholds
from tasks.grow import grow
from tasks.score import score
from tasks.train import improve


@flow(name="rest", log_prints=True, validate_parameters=True)
def rest(recipe: Recipe, run_name: str | None = None) -> dict[str, Any]:
    """Grow a dataset from the policy, filter it with a rising threshold, fine-tune, repeat.

    Args:
        recipe: The experiment: task, model, reward, loop settings, lake and MLflow (recipes/*.yaml).
        run_name: Name of the run in the lake and MLflow; re-using a name resumes that run.
    """
    # Train pi_theta on D (behaviour cloning), and measure where we start.
    with open_loop(recipe, run_name, "rest") as loop:
        ref, clock = loop.ref, loop.clock
        base = policy = loop.initial
        best, stale = loop.baseline_reward, 0

        for g in range(1, recipe.grow_steps + 1):
            # Grow: D_g = samples of pi_theta, annotated with R(x, y).
            samples = clock("grow", grow, ref, policy, g)
            scored = clock("score", score, ref, samples, g)
            for i, tau in enumerate(thresholds(ref, scored), start=1):
                # Improve: keep F(x, y; tau_i) and fine-tune on it.
                kept = clock("filter", filter_stage, ref, scored, g, i, tau)
                if kept.kept == 0:
                    loop.skip(g, i, kept, "filter kept no rows", tau=tau)
                    print(f"iteration {g} step {i}: the filter (tau={figure(tau)}) kept no rows; skipping this Improve step")
                    continue
                start = base if recipe.improve.restart_from_base else policy
                candidate = clock("train", improve, ref, start, kept.uri, g, i)
                metrics = clock("evaluate", evaluate, ref, candidate, g, i)
                reg = loop.finish_step(g, i, candidate, metrics, start=start, scored=scored, selection=kept,
                                       logged={"tau": tau or 0.0, "kept": kept.kept}, tau=tau)
                # while reward improves on D_eval (and the promotion guards hold: a hacked step is not built on)
                if metrics["eval_reward"] > best and not set(reg.blocked_by) - {"improvement"}:
                    policy, best, stale = candidate, metrics["eval_reward"], 0
                else:
                    stale += 1
                if stale >= recipe.eval.patience:
                    return loop.summary.stop(f"held-out reward did not improve for {stale} Improve step(s)")
        return loop.summary.stop("completed all Grow steps")
