"""Stage placement: Grow, training and evaluation on the GPU pool, scoring and filtering on the CPU pool.

The end-to-end test (slow) is the production layout of infra/prefect.yaml on one machine: a real
Prefect server, the two process work pools, the ``flywheel-stage`` deployments registered with a
real ``prefect deploy``, one real worker per pool, and a ReST run on a real S3 server whose recipe
sends each stage to its pool. It checks which pool ran every stage, that the datasets are row for
row those of the same seeded run with every stage in-process, and that no stage result is left in
the lake. The fast tests cover the stage flow itself, the recipe's checks and the one-sentence
errors for a missing server or deployment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from alignment.recipe import Recipe, RecipeError
from tasks.context import RunRef
from tasks.lake import Lake
from tests.prefect_fixtures import stop_process

ROOT = Path(__file__).resolve().parent.parent

RECIPE = {
    "name": "placed", "algorithm": "rest", "seed": 3, "grow_steps": 1,
    "task": {"n_labelled": 60, "n_prompts": 40, "n_eval": 20},
    "warm_start": {"epochs": 4, "lr": 0.003, "batch_size": 16},
    "grow": {"samples_per_prompt": 2, "max_new_tokens": 5, "shards": 2},
    "improve": {"epochs": 1, "steps": 1},
    "eval": {"max_new_tokens": 5},
}
ON_POOLS = {
    "grow": "flywheel-stage/gpu", "train": "flywheel-stage/gpu", "evaluate": "flywheel-stage/gpu",
    "score": "flywheel-stage/cpu", "filter": "flywheel-stage/cpu",
}


def test_stage_deployments_are_checked_by_the_recipe():
    with pytest.raises(ValidationError, match="'FLOW/DEPLOYMENT'"):
        Recipe.model_validate({"name": "r", "orchestration": {"stage_deployments": {"grow": "gpu"}}})
    with pytest.raises(ValidationError, match="stage_deployments.sample"):
        Recipe.model_validate({"name": "r", "orchestration": {"stage_deployments": {"sample": "flywheel-stage/gpu"}}})
    with pytest.raises(ValidationError, match="greater than 0"):
        Recipe.model_validate({"name": "r", "orchestration": {"stage_timeout_s": 0}})


def test_stages_on_pools_need_a_server(workdir):
    """Without PREFECT_API_URL the run stops before anything is written, saying what to set."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.run import run_recipe

    recipe = Recipe.model_validate({**RECIPE, "lake": "file://./lake", "orchestration": {"stage_deployments": ON_POOLS}})
    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(RecipeError, match="export PREFECT_API_URL"):
            run_recipe(recipe, "no-server")
    assert not (workdir / "lake" / "runs" / "no-server").exists()


def test_a_missing_stage_deployment_is_named(api):
    from tasks.placement import check_stage_deployments

    recipe = Recipe.model_validate({"name": "r", "orchestration": {"stage_deployments": {"grow": "flywheel-stage/nowhere"}}})
    with pytest.raises(RecipeError, match=r"sends grow to deployment 'flywheel-stage/nowhere', which is not on the Prefect server"):
        check_stage_deployments(recipe)


def _scored_input(lake_uri: str) -> tuple[RunRef, str, str]:
    """A run with a committed one-part ``samples`` stage: the input of a scoring stage."""
    recipe = Recipe.model_validate({**RECIPE, "lake": lake_uri})
    ref = RunRef(run="stage-flow", lake=lake_uri, recipe=recipe, cache_dir="unused-by-scoring")
    lake, uri = ref.open_lake(), ref.stage_uri(1, "samples")
    frame = pl.DataFrame({
        "prompt_id": [0, 0, 1], "prompt": ["1+2=", "1+2=", "3+4="], "reference": ["3", "3", "7"],
        "completion": ["3", "4", "7"], "sample_idx": [0, 1, 0], "policy_version": "base", "num_tokens": [1, 1, 1],
    }, schema_overrides={"sample_idx": pl.Int32, "num_tokens": pl.Int32})
    part = lake.write_part(uri, 0, frame)
    lake.commit(uri, [part], config={}, parents=[])
    return ref, uri, part["name"]


def test_stage_flow_runs_a_registered_body_and_leaves_its_result(workdir):
    """What a worker runs: the body, with this machine's cache, its return value left in the lake for the caller."""
    from flows.stage import stage
    from tasks.placement import result_uri
    from tasks.score import score_part

    ref, samples, part = _scored_input((workdir / "lake").as_uri())
    state = stage(stage="score", function="tasks.score:score_part", ref=ref, args=[samples, 1, part, 0], return_state=True)
    assert state.is_completed()
    returned = state.result()
    left = ref.open_lake().get_json(result_uri(ref, str(state.state_details.flow_run_id)))
    assert left == {"result": returned}
    staged = ref.open_lake().address(ref.stage_uri(1, "scored")).staging_uri  # a part waits there for the stage's commit
    scored = ref.open_lake().store.get(f"{staged}/{returned['name']}")
    assert pl.read_parquet(scored)["reward"].to_list() == [1.0, 0.0, 1.0]
    assert returned == score_part(ref, samples, 1, part, 0)  # the same part as the body called here

    with pytest.raises(ValueError, match="'os:system' is not a flywheel stage"):
        stage(stage="score", function="os:system", ref=ref, args=["true"])


# -- the production layout on one machine --------------------------------------------------------
def _start_worker(pool: str, api: str, home: Path, limit: int | None) -> tuple[subprocess.Popen, Path]:
    home.mkdir(parents=True)
    log = home / "worker.log"
    env = {
        **os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_WORKER_QUERY_SECONDS": "1", "FLYWHEEL_CACHE_DIR": str(home / "cache"),
    }
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", f"test-{pool}"]
    if limit:
        command += ["--limit", str(limit)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(command, cwd=home, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _stage_runs(run_name: str) -> list[dict]:
    """Every ``flywheel-stage`` flow run of the flywheel run ``run_name``: its stage, pool, state and parent task."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["flywheel-stage"])), limit=200)
        pools = {}
        out = []
        for r in runs:
            if r.parameters["ref"]["run"] != run_name:
                continue
            if r.deployment_id not in pools:
                pools[r.deployment_id] = client.read_deployment(r.deployment_id).work_pool_name
            out.append({"stage": r.parameters["stage"], "pool": pools[r.deployment_id], "state": r.state.type.value,
                        "parent_task_run": r.parent_task_run_id, "function": r.parameters["function"]})
    return out


@pytest.mark.slow
def test_stages_run_on_their_work_pools(api, s3_lake, workdir):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.run import run_recipe

    with get_client(sync_client=True) as client:
        for pool in ("flywheel-cpu", "flywheel-gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(workdir / "prefect-cli"), "FLYWHEEL_HOME": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
         "--name", "gpu", "--name", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    tracking = {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"}
    base = {**RECIPE, "lake": s3_lake, "mlflow": tracking}
    on_pools = Recipe.model_validate({**base, "orchestration": {"stage_deployments": ON_POOLS, "stage_timeout_s": 600}})
    gpu, gpu_log = _start_worker("flywheel-gpu", api, workdir / "gpu-worker", limit=1)
    cpu, cpu_log = _start_worker("flywheel-cpu", api, workdir / "cpu-worker", limit=None)
    start = time.monotonic()
    try:
        summary = run_recipe(on_pools, "on-pools")
    except Exception:
        print("gpu worker:\n", gpu_log.read_text()[-5000:], "\ncpu worker:\n", cpu_log.read_text()[-5000:])
        raise
    finally:
        stop_process(gpu)
        stop_process(cpu)
    on_pools_s = time.monotonic() - start
    start = time.monotonic()
    in_process = run_recipe(Recipe.model_validate(base), "in-process")
    print(f"on the pools: {on_pools_s:.0f} s; in one process: {time.monotonic() - start:.0f} s")

    runs = _stage_runs("on-pools")
    assert runs and all(r["state"] == "COMPLETED" for r in runs), runs
    assert all(r["parent_task_run"] is not None for r in runs)  # nested under the task that sent it
    pools = {}
    for r in runs:
        pools.setdefault(r["stage"], set()).add(r["pool"])
    assert pools == {"grow": {"flywheel-gpu"}, "train": {"flywheel-gpu"}, "evaluate": {"flywheel-gpu"},
                     "score": {"flywheel-cpu"}, "filter": {"flywheel-cpu"}}, runs
    by_function = {}
    for r in runs:
        by_function[r["function"]] = by_function.get(r["function"], 0) + 1
    # warm start + Improve; baseline + Improve evaluation; 2 Grow shards; 2 shards + labelled scored; tau + filter
    assert by_function == {"tasks.train:fit_sft": 2, "tasks.evaluate:write_eval": 2, "tasks.grow:sample_shard": 2,
                           "tasks.score:score_part": 3, "tasks.filter:compute_thresholds": 1,
                           "tasks.filter:write_filtered": 1}, by_function

    lake = Lake(s3_lake)
    for iteration, stage, step in [(1, "samples", None), (1, "scored", None), (1, "filtered", 1), (0, "eval", 0), (1, "eval", 1)]:
        placed = lake.read(lake.stage_uri("on-pools", iteration, stage, step))
        local = lake.read(lake.stage_uri("in-process", iteration, stage, step))
        assert placed.height > 0 and placed.equals(local), (stage, step)
    assert [r["eval_reward"] for r in summary["iterations"]] == [r["eval_reward"] for r in in_process["iterations"]]
    assert lake.store.list(f"{s3_lake}/on-pools/_stage_results") == []
