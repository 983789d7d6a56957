"""What every loop does around its algorithm: open the run and start it, and record each trained step.

- ``open_loop`` opens the run (``open_run``), ends its MLflow runs with the flow's outcome
  (``tracked``), writes the run's inputs as iteration 0, warm-starts the policy ("Train pi_theta on
  D", ReST's Algorithm 1, arXiv 2308.08998), evaluates and registers it as the baseline, and hands
  the flow a ``Loop``.
- ``Loop.finish_step`` is what follows a candidate's held-out evaluation, whatever trained it: the
  step's figures, its model version and champion decision, its summary row, its Prefect artifacts,
  and which held-out answers the next win rate is measured against. A flow that trains several
  times between evaluations calls it once per evaluation.

Opening checks what keeps the run whole (``tasks.lake.runs``): its name and model name are safe, this
process holds the run's lease (one writer per run), and the recipe is the one the run was created
with. ``flywheel run`` makes the same checks before Prefect starts (``flows.run.run_recipe``); a run
started from a deployment makes them here.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from alignment.recipe import Recipe
from tasks.context import RunRef, local_cache_dir
from tasks.evaluate import evaluate
from tasks.inputs import prepare_inputs
from tasks.lake import default_run_name, guard_run, release
from tasks.placement import check_stage_deployments
from tasks.report.artifacts import publish_iteration
from tasks.report.summary import Summary
from tasks.results import Registration, Selection
from tasks.step_metrics import Stopwatch, step_metrics
from tasks.tracking.registry import log_step_metrics, register, start_tracking, tracked
from tasks.train import train_metrics, warm_start


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


@dataclass
class Loop:
    """What the iterations of one run share, and the bookkeeping of a step once its candidate is evaluated."""

    ref: RunRef
    summary: Summary
    initial: str  # the policy the loop starts from: the warm-started checkpoint (or the base model)
    baseline_reward: float  # its held-out reward
    versions: dict[str, str]  # checkpoint URI -> model version: a candidate's parent is its start's version
    champion_eval: str  # the champion's held-out answers, which win rates are measured against
    clock: Stopwatch = field(default_factory=Stopwatch)  # the stages' seconds, logged with each step

    def finish_step(self, iteration: int, step: int, candidate: str, metrics: dict[str, float], *, start: str,
                    scored: str, selection: Selection, logged: dict[str, float], **row: Any) -> Registration:
        """Record step (``iteration``, ``step``): ``candidate``, trained from ``start`` on ``selection``
        (drawn from ``scored``), has held-out ``metrics``; returns its registration and champion decision.

        ``logged`` are the algorithm's own figures for MLflow (ReST's tau and kept rows, DPO's pairs),
        ``row`` its own columns of the summary row (ReST's tau, DPO's loss).
        """
        ref, clock = self.ref, self.clock
        eval_uri = ref.stage_uri(iteration, "eval", step)
        extra = step_metrics(ref, scored, selection.uri, eval_uri, self.champion_eval, clock.seconds)
        trained = train_metrics(ref, candidate)
        reg = clock("register", register, ref, candidate, metrics, iteration, step, [selection.uri, eval_uri],
                    parent_version=self.versions[start], step_metrics={**logged, **trained, **extra})
        log_step_metrics(ref, iteration, step, {"seconds_register": clock.seconds["seconds_register"]})
        self.versions[candidate] = reg.model_version
        self.summary.step(iteration, step, selection, metrics, reg, **row, **extra, **trained_on(ref, trained),
                          seconds_register=clock.seconds["seconds_register"])
        publish_iteration(ref, iteration, scored, selection.uri)
        self.champion_eval = eval_uri if reg.promoted else self.champion_eval
        return reg

    def skip(self, iteration: int, step: int, selection: Selection, reason: str, **row: Any) -> None:
        """Record a step that trained nothing (``selection`` holds no rows to train on) in the summary."""
        self.summary.step(iteration, step, selection, None, None, **row, skipped=reason)


def trained_on(ref: RunRef, trained: dict[str, float]) -> dict[str, Any]:
    """How a step's training ran, for its summary row: the world size, the strategy and each rank's peak memory."""
    world = int(trained.get("world_size", 1))
    peaks = [trained[f"peak_memory_mib_rank{r}"] for r in range(world) if f"peak_memory_mib_rank{r}" in trained]
    return {"world_size": world, "strategy": ref.recipe.distributed.strategy if world > 1 else "none",
            "train_peak_memory_mib": peaks}


@contextlib.contextmanager
def open_loop(recipe: Recipe, run_name: str | None, algorithm: str) -> Iterator[Loop]:
    """Open the run, write its inputs, train pi_theta on D (the warm start) and measure where it starts.

    The ``with`` body is the algorithm; its MLflow runs end FINISHED, FAILED or KILLED with it.
    """
    ref = open_run(recipe, run_name)
    with tracked(ref):
        summary = Summary(ref, algorithm)
        inputs = prepare_inputs(ref)
        policy = warm_start(ref, inputs["base"]) if recipe.warm_start.enabled else inputs["base"]
        metrics = evaluate(ref, policy, 0, 0)
        reg = register(ref, policy, metrics, 0, 0, [inputs["labelled"], ref.stage_uri(0, "eval", 0)])
        summary.baseline(metrics, reg)
        yield Loop(ref, summary, policy, metrics["eval_reward"], {policy: reg.model_version}, ref.stage_uri(0, "eval", 0))
