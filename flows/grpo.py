"""GRPO as a Prefect flow: Algorithm 1 ("Iterative Group Relative Policy Optimization") of Shao et al.,
"DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", arXiv 2402.03300.

Run it on a laptop (embedded Prefect, SQLite MLflow, a local lake)::

    flywheel run recipes/arithmetic-grpo.yaml
    flywheel run recipes/arithmetic-grpo.yaml --set grpo.beta=0 --set grpo.loss_agg=token --set grpo.epsilon_high=0.28

On GPU workers, set ``grow.sampler: vllm`` and serve the recipe with ``flywheel serve`` so Grow, the log-prob
passes (placed as ``pair``) and training land on the GPU pool (see infra/prefect.yaml).

Each iteration resets the reference to the current policy (``grpo.reference: iteration``, as Algorithm 1; or
keeps the initial policy), then runs M steps: sample a batch of prompts, G completions each from the current
policy π_old, reward them, keep the groups whose rewards differ, store each sample's advantage and per-token
log-probs under π_old and π_ref, and take μ epochs of updates of the clipped objective (Eq. 3). The iteration's
last policy is evaluated, registered and offered to the champion gate. A step's checkpoint is dropped once the
next step's commits: the lake keeps one model per iteration.

Where this departs from the paper: the reward model is not retrained between iterations (the reward is the
recipe's: a verifier, a reward model or a function); groups whose rewards are all equal and truncated samples
are dropped before the update (DAPO, arXiv 2503.14476, §3.2 and §3.4); π_old's log-probs come from a stored
no-grad pass rather than the policy held in memory, and the μ epochs reuse the step's samples; ``epsilon_high``
(clip-higher), ``loss_agg: token`` and ``scale_rewards: none`` (Dr. GRPO, arXiv 2503.20783) are options.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alignment.recipe import Recipe
from flows.loop import Loop, open_loop
from tasks.evaluate import evaluate
from tasks.filter import group_stage
from tasks.grow import grow
from tasks.results import Selection
from tasks.context import log
from tasks.score import score
from tasks.tracking.registry import log_step_metrics
from tasks.train import drop_superseded, grpo_figures, last_checkpoint, train_grpo


@flow(name="grpo", log_prints=True, validate_parameters=True)
def grpo(recipe: Recipe, run_name: str | None = None) -> dict[str, Any]:
    """Iterations of M steps: sample G completions for a batch of prompts, reward them, update with the
    group-relative clipped objective for μ epochs; evaluate and register each iteration's policy.

    Args:
        recipe: The experiment: task, model, reward, loop settings, lake and MLflow (recipes/*.yaml).
        run_name: Name of the run in the lake and MLflow; re-using a name resumes that run.
    """
    with open_loop(recipe, run_name, "grpo") as loop:  # Input: the initial policy π_θ_init (warm-started), measured
        ref, clock, cfg = loop.ref, loop.clock, recipe.grpo
        policy = loop.initial
        if (prompts := ref.open_lake().manifest(ref.stage_uri(0, "prompts")).rows) < cfg.prompts_per_step:
            log().warning("grpo.prompts_per_step=%d is more than the task's %d prompts: every step samples all of them",
                          cfg.prompts_per_step, prompts)

        for g in range(1, recipe.grow_steps + 1):  # for iteration = 1, ..., I
            start = policy
            reference = start if cfg.reference == "iteration" else loop.initial  # π_ref ← π_θ
            resumed = last_checkpoint(ref, g, cfg.steps_per_iteration)
            steps, last = [], None
            for i in range(1, cfg.steps_per_iteration + 1):  # for step = 1, ..., M
                clock.seconds.clear()  # each step's stage seconds are its own
                # Sample a batch D_b; π_old ← π_θ; sample G outputs for each question, and compute their rewards.
                samples = clock("grow", grow, ref, policy, g, i)
                scored = clock("score", score, ref, samples, g, i)
                # Keep the groups whose rewards differ; their advantages, and π_old's and π_ref's per-token log-probs.
                groups = clock("groups", group_stage, ref, scored, g, i, policy, reference)
                if groups.kept and i >= resumed:  # a step before `resumed` trained, and its checkpoint was dropped
                    # for GRPO iteration = 1, ..., μ: update π_θ by maximising the GRPO objective (Eq. 3).
                    policy = clock("train", train_grpo, ref, policy, groups.uri, g, i)
                    drop_superseded(ref, g, i)
                last = (i, scored, groups) if groups.kept else last
                steps.append(_step(loop, g, i, groups, logged=i >= resumed))
            if policy == start:
                loop.skip(g, cfg.steps_per_iteration, _total(steps, groups.uri), "no group's rewards differed", steps=steps)
                print(f"iteration {g}: every group's rewards were equal in every step; nothing trained")
                continue
            step, scored, groups = last
            metrics = clock("evaluate", evaluate, ref, policy, g, step)
            loop.finish_step(g, step, policy, metrics, start=start, scored=scored, selection=_total(steps, groups.uri),
                             logged={"groups": sum(s["groups"] for s in steps)}, steps=steps)
        return loop.summary.stop("completed all iterations")


def _step(loop: Loop, iteration: int, step: int, groups: Selection, *, logged: bool) -> dict[str, Any]:
    """A step's row of the iteration's ``steps``: its samples, kept samples and groups, its diagnostics and stage
    seconds; ``logged`` to the iteration's MLflow run (step axis: the step), which an interrupted attempt did for
    the steps before the one its iteration resumes from."""
    ref = loop.ref
    figures = grpo_figures(ref, groups.uri, ref.stage_uri(iteration, "updates", step))
    seconds = {k: v for k, v in loop.clock.seconds.items() if k in ("seconds_grow", "seconds_score", "seconds_groups",
                                                                      "seconds_train")}  # fmt: skip
    row = {"step": step, "samples": groups.samples, "kept": groups.kept,
           "groups": ref.open_lake().manifest_doc(groups.uri).get("groups", 0), **figures, **seconds}
    if logged:
        log_step_metrics(ref, iteration, step, {k: v for k, v in row.items() if k != "step"})
    return row


def _total(steps: list[dict[str, Any]], uri: str) -> Selection:
    """The iteration's samples and kept samples over its steps, and the stage of the step its policy trained last."""
    return Selection(uri=uri, kept=sum(s["kept"] for s in steps), samples=sum(s["samples"] for s in steps))
