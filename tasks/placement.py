"""Where a stage runs: in the flow run's process, or as a flow run of a deployment on another work pool.

Every stage body is a plain module-level function ``fn(ref, *args)`` whose arguments are JSON
values and whose data goes through the lake, so it can run anywhere the lake is
reachable. ``run_stage(ref, stage, fn, *args)`` runs it

- **here**, when ``orchestration.stage_deployments`` does not name the stage: GPU stages (Grow,
  training, evaluation, the reference pass of pairing, and scoring with ``score_on_gpu``) hold a slot
  of the GPU concurrency limit and, with ``isolate_gpu_stages``, get a fresh process (tasks/gpu.py);
- **on a work pool**, when it does: a flow run of that deployment of the ``flywheel-stage`` flow
  (flows/stage.py) is created as a child of the calling task (the Prefect UI nests it under the
  task), a worker of the deployment's pool runs the body there (taking the GPU slot of *its* host),
  writes the return value next to the run's data in the lake, and this process reads it back.

With the deployments of infra/prefect.yaml, Grow, training and evaluation go to ``flywheel-gpu`` and
scoring and filtering to ``flywheel-cpu``; the orchestrating flow itself needs no GPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from alignment.recipe import Recipe, RecipeError
from tasks.context import RunRef, log
from tasks.gpu import run_gpu_stage

T = TypeVar("T")

GPU_STAGES = frozenset({"grow", "train", "evaluate", "pair"})
# Stages that run as ranks under distributed.strategy ddp/fsdp: training, and the no-grad passes of the
# reference policy (iterative DPO's pairs, GRPO's π_old/π_ref), which split their rows across the ranks.
RANKED_STAGES = frozenset({"train", "pair"})

# A stage run nobody picks up is most likely missing its worker: say so once it has waited this long.
UNCLAIMED_WARNING_S = 60.0


class StageFailed(RuntimeError):
    """A stage's flow run on a work pool ended in a state other than Completed."""


def is_gpu_stage(recipe: Recipe, stage: str) -> bool:
    return stage in GPU_STAGES or (stage == "score" and recipe.orchestration.score_on_gpu)


def function_name(fn: Callable[..., Any]) -> str:
    """``module:function``, the name ``flows.stage`` looks the body up by."""
    return f"{fn.__module__}:{fn.__name__}"


def run_stage(ref: RunRef, stage: str, fn: Callable[..., T], *args: Any, label: str = "") -> T:
    """``fn(ref, *args)`` where the recipe places ``stage``; ``label`` names this call in flow-run names and logs."""
    deployment = ref.recipe.orchestration.stage_deployments.get(stage)  # type: ignore[call-overload]
    if deployment is None:
        return run_here(ref, stage, fn, *args)
    return run_on_pool(ref, stage, deployment, fn, *args, label=label)


def run_once(ref: RunRef, uri: str, stage: str, fn: Callable[..., Any], *args: Any, label: str = "") -> str:
    """Run a stage that commits ``uri`` at most once: skip it when ``uri`` is committed, else ``fn(ref, *args)``
    where the recipe places ``stage``. The body replaces whatever an interrupted attempt left at ``uri``
    (``Lake.write_stage``, ``Lake.put_dir``) and commits it last. Returns ``uri``."""
    if not ref.open_lake().is_done(uri):
        run_stage(ref, stage, fn, *args, label=label)
    return uri


def run_sharded(ref: RunRef, uri: str, stage: str, submit: Callable[[], list[Any]], commit: Callable[[list[dict]], str]) -> str:
    """Run a sharded stage that commits ``uri`` at most once: skip it when ``uri`` is committed; else clear what an
    interrupted attempt left, ``submit()`` the shard tasks (each stages one part, ``Lake.write_part``; on Ray a GPU
    stage's shards ask for their GPUs), wait for every one, and ``commit(parts)``. A failed shard clears the stage's
    parts before its error propagates, so nothing half-made is left behind. Returns what ``commit`` returns."""
    from prefect.futures import wait

    lake = ref.open_lake()
    if lake.is_done(uri):
        return uri
    lake.clear(uri)
    with ray_resources(ref.recipe, stage):
        futures = submit()
    wait(futures)  # every shard has finished or failed before anything is cleaned up
    try:
        parts = [f.result() for f in futures]
    except Exception:
        lake.clear(uri)
        raise
    return commit(parts)


def run_here(ref: RunRef, stage: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(ref, *args)`` in this process (or a fresh one), holding a GPU slot for a GPU stage; a training stage
    (or a reference pass) with ``distributed.strategy`` ddp or fsdp and more than one rank runs as that many ranks
    (``tasks.launch``)."""
    if stage in RANKED_STAGES and ref.recipe.distributed.world_size > 1:
        from tasks.launch import run_ranks

        d = ref.recipe.distributed
        started = time.monotonic()
        result = run_ranks(ref.recipe, ref.run, stage, fn, ref, *args)
        log().info("%s ran as %d ranks (%s, %s) in %.4g s", stage, d.world_size, d.strategy, d.launcher, time.monotonic() - started)
        return result
    if is_gpu_stage(ref.recipe, stage):
        return run_gpu_stage(ref.recipe, fn, ref, *args)
    return fn(ref, *args)


@contextlib.contextmanager
def ray_resources(recipe: Recipe, stage: str) -> Iterator[None]:
    """Tasks submitted inside ask Ray for ``orchestration.ray_gpus_per_stage`` GPUs each, for a GPU stage on Ray.

    Ray then places each shard on a node with a free GPU (or a fraction of one: 0.5 runs two shards
    per GPU) and sets the shard's ``CUDA_VISIBLE_DEVICES``; on the thread runner this does nothing.
    """
    orch = recipe.orchestration
    if orch.runner != "ray" or not orch.ray_gpus_per_stage or not is_gpu_stage(recipe, stage):
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(num_gpus=orch.ray_gpus_per_stage):
        yield


def result_uri(ref: RunRef, flow_run_id: str) -> str:
    """Where a stage's flow run leaves its return value: beside the run's data, keyed by the flow run."""
    return f"{ref.open_lake().run_uri(ref.run)}/stage_results/{flow_run_id}/result.json"


def run_on_pool(ref: RunRef, stage: str, deployment: str, fn: Callable[..., T], *args: Any, label: str = "") -> T:
    """Create a flow run of ``deployment`` for this stage, wait for a worker to finish it, return its value."""
    from prefect.deployments import run_deployment

    parameters = {"stage": stage, "function": function_name(fn), "ref": ref.model_dump(mode="json"), "args": list(args)}
    what = f"{stage} {label}".strip()
    run = run_deployment(deployment, parameters=parameters, timeout=0, flow_run_name=f"{ref.run} {what}", tags=["flywheel", stage])
    log().info("%s: flow run %r of %s", what, run.name, deployment)
    run = _wait(run, what, deployment, ref.recipe.orchestration.stage_timeout_s)
    if not run.state.is_completed():
        raise StageFailed(
            f"Stage {what} ({function_name(fn)}) ran as flow run {run.name!r} of {deployment} and ended "
            f"{run.state.name}: {run.state.message or 'see that flow run in the Prefect UI'}."
        )
    lake, uri = ref.open_lake(), result_uri(ref, str(run.id))
    value = lake.get_json(uri)["result"]
    lake.store.delete_prefix(uri.rsplit("/", 1)[0])
    return value


def _wait(run, what: str, deployment: str, timeout: float | None):
    """Poll the flow run until it is final; warn once if no worker claims it, cancel it after ``timeout``."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    start, delay, warned = time.monotonic(), 0.25, False
    with get_client(sync_client=True) as client:
        while not (run.state and run.state.is_final()):
            waited = time.monotonic() - start
            if timeout is not None and waited > timeout:
                client.set_flow_run_state(run.id, Cancelling(message=f"stage_timeout_s={timeout:g} passed"), force=True)
                raise StageFailed(
                    f"Stage {what} (flow run {run.name!r} of {deployment}) did not finish within "
                    f"orchestration.stage_timeout_s={timeout:g} s and was cancelled."
                )
            if not warned and waited > UNCLAIMED_WARNING_S and run.state and run.state.is_scheduled():
                pool = client.read_deployment_by_name(deployment).work_pool_name
                log().warning(
                    "%s: flow run %r has waited %.0f s for a worker of pool %r; start one there: "
                    "prefect worker start --pool %s", what, run.name, waited, pool, pool,
                )
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            run = client.read_flow_run(run.id)
    return run


def check_stage_deployments(recipe: Recipe) -> None:
    """Before the run starts: every deployment the recipe sends a stage to exists on a configured server."""
    names = sorted(set(recipe.orchestration.stage_deployments.values()))
    if not names:
        return
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RecipeError(
            "orchestration.stage_deployments sends stages to work pools, which needs a Prefect server with workers: "
            "export PREFECT_API_URL=http://HOST:4200/api (or run `flywheel stack up`), or remove stage_deployments."
        )
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                stages = sorted(s for s, d in recipe.orchestration.stage_deployments.items() if d == name)
                raise RecipeError(
                    f"orchestration.stage_deployments sends {', '.join(stages)} to deployment {name!r}, which is not on "
                    f"the Prefect server at {url}; deploy it (prefect deploy --prefect-file infra/prefect.yaml --all) "
                    "or fix the name."
                ) from None
