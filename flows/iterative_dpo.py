"""Online iterative DPO as a Prefect flow: Xiong et al., "Iterative Preference Learning from Human
Feedback" (arXiv 2312.11456), as practised in Dong et al., "RLHF Workflow: From Reward Modeling to
Online RLHF" (arXiv 2405.07863).

Run it on a laptop::

    flywheel run recipes/arithmetic-dpo.yaml
    flywheel run recipes/arithmetic-dpo.yaml --set preference.loss=ipo

Each iteration t samples N completions per prompt from the current policy, scores them, pairs the
best against the worst (rejection sampling, as Dong et al. pair the best of 8 samples against the
worst), computes the reference log-probs once, and trains with ``preference.loss`` — any entry of
``alignment.loss_table.LOSSES``, each declared with its paper. The lake, lineage and champion gate
are those of ReST.

Where this departs from the papers: the policy continues from the latest iterate whether or not its
held-out reward improved (the champion alias alone tracks the best held-out model;
``preference.start_from: initial`` restarts each iteration from the initial policy instead), and the
reference is the initial policy unless ``preference.reference: previous``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alignment.recipe import Recipe
from flows.loop import open_loop
from tasks.evaluate import evaluate
from tasks.grow import grow
from tasks.pair import pair
from tasks.score import score
from tasks.train import train_preference


@flow(name="iterative-dpo", log_prints=True, validate_parameters=True)
def iterative_dpo(recipe: Recipe, run_name: str | None = None) -> dict[str, Any]:
    """Sample, score, pair best against worst, train with a preference loss, repeat T times.

    Args:
        recipe: The experiment: task, model, reward, loop settings, lake and MLflow (recipes/*.yaml).
        run_name: Name of the run in the lake and MLflow; re-using a name resumes that run.
    """
    with open_loop(recipe, run_name, "iterative_dpo") as loop:  # pi_0: the warm-started policy, measured
        ref, clock, cfg = loop.ref, loop.clock, recipe.preference
        initial = policy = loop.initial

        for t in range(1, recipe.grow_steps + 1):
            samples = clock("grow", grow, ref, policy, t)
            scored = clock("score", score, ref, samples, t)
            reference = initial if cfg.reference == "initial" else policy
            pairs = clock("pair", pair, ref, scored, t, reference)
            start = policy if cfg.start_from == "previous" else initial
            candidate = clock("train", train_preference, ref, start, pairs.uri, scored, t)
            if candidate is None:  # the loss trains on pairs and there are none
                loop.skip(t, 1, pairs, "no pairs above the margin")
                print(f"iteration {t}: every prompt's samples tied (no pairs); skipping training")
                continue
            metrics = clock("evaluate", evaluate, ref, candidate, t, 1)
            loop.finish_step(t, 1, candidate, metrics, start=start, scored=scored, selection=pairs,
                             logged={"pairs": pairs.kept}, loss=cfg.loss)
            policy = candidate
        return loop.summary.stop("completed all iterations")
