"""Online iterative DPO as a Prefect flow (Xiong et al., seed notes 003; losses from seed notes 004).

Run it on a laptop::

    flywheel run recipes/arithmetic-dpo.yaml
    flywheel run recipes/arithmetic-dpo.yaml --set preference.loss=ipo

Each iteration t samples N completions per prompt from the current policy, scores them, pairs the
best against the worst (rejection sampling, as in the notes' "best-of-4 vs worst-of-4"), computes
the reference log-probs once, and trains with ``preference.loss`` — any entry of
``alignment.loss_table.LOSSES``. The lake, lineage and champion gate are those of ReST.

Where this departs from the notes: the policy always continues from the latest iterate (the
champion alias alone tracks the best held-out model), and the reference is the initial policy
unless ``preference.reference: previous``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alignment.recipe import Recipe
from flows.common import open_run, warm_start_and_baseline
from tasks.report.artifacts import publish_iteration
from tasks.evaluate import evaluate
from tasks.grow import grow
from tasks.inputs import prepare_inputs
from tasks.pair import pair
from tasks.tracking.registry import log_step_metrics, register, tracked
from tasks.report.summary import Summary
from tasks.score import score
from tasks.step_metrics import Stopwatch, step_metrics
from tasks.train import train_metrics, train_preference


@flow(name="iterative-dpo", log_prints=True, validate_parameters=True)
def iterative_dpo(recipe: Recipe, run_name: str | None = None) -> dict[str, Any]:
    """Sample, score, pair best against worst, train with a preference loss, repeat T times.

    Args:
        recipe: The experiment: task, model, reward, loop settings, lake and MLflow (recipes/*.yaml).
        run_name: Name of the run in the lake and MLflow; re-using a name resumes that run.
    """
    ref = open_run(recipe, run_name)
    with tracked(ref):  # the MLflow runs end FINISHED, FAILED or KILLED with the flow
        summary = Summary(ref, "iterative_dpo")
        inputs = prepare_inputs(ref)
        cfg = recipe.preference

        policy, _, versions = warm_start_and_baseline(ref, inputs, summary)
        initial = policy
        champion_eval, clock = ref.stage_uri(0, "eval", 0), Stopwatch()  # win rates are against the champion's answers

        for t in range(1, recipe.grow_steps + 1):
            samples = clock("grow", grow, ref, policy, t)
            scored = clock("score", score, ref, samples, t)
            reference = initial if cfg.reference == "initial" else policy
            pairs = clock("pair", pair, ref, scored, t, reference)
            start = policy if cfg.start_from == "previous" else initial
            candidate = clock("train", train_preference, ref, start, pairs.uri, scored, t)
            if candidate is None:  # the loss trains on pairs and there are none
                summary.step(t, 1, pairs, None, None, skipped="no pairs above the margin")
                print(f"iteration {t}: every prompt's samples tied (no pairs); skipping training")
                continue
            metrics = clock("evaluate", evaluate, ref, candidate, t, 1)
            extra = step_metrics(ref, scored, pairs.uri, ref.stage_uri(t, "eval", 1), champion_eval, clock.seconds)
            reg = clock("register", register, ref, candidate, metrics, t, 1, [pairs.uri, ref.stage_uri(t, "eval", 1)],
                        parent_version=versions[start],
                        step_metrics={"pairs": pairs.kept, **train_metrics(ref, candidate), **extra})
            log_step_metrics(ref, t, 1, {"seconds_register": clock.seconds["seconds_register"]})
            versions[candidate] = reg.model_version
            summary.step(t, 1, pairs, metrics, reg, loss=cfg.loss, **extra, seconds_register=clock.seconds["seconds_register"])
            publish_iteration(ref, t, scored, pairs.uri)
            champion_eval = ref.stage_uri(t, "eval", 1) if reg.promoted else champion_eval
            policy = candidate
        return summary.stop("completed all iterations")
