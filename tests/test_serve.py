"""``flywheel serve``: recipes as Prefect deployments with a typed, described parameter form.

A real ``prefect server start`` (own PREFECT_HOME, a free loopback port, SQLite; the session's, from
tests/prefect_fixtures.py) serves these tests. The end-to-end test starts the real ``flywheel serve``
command against it, triggers the deployment through the API with parameters edited the way the UI's
"Custom run" form edits them (fewer samples, another lake on a real S3 server, another MLflow
database), waits for the run, and finds the datasets in S3 and the new model version in MLflow. With a ``gpu`` global concurrency
limit on the server, Grow shards and training take its slot, which is free again afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignment.recipe import Recipe, load_recipe
from flows.serve import build_deployments
from tests.prefect_fixtures import stop_process

RECIPE = {
    "name": "served-rest", "algorithm": "rest", "seed": 0, "grow_steps": 2,
    "task": {"n_labelled": 60, "n_prompts": 60, "n_eval": 30},
    "warm_start": {"epochs": 5, "lr": 0.003, "batch_size": 16},
    "grow": {"samples_per_prompt": 4, "max_new_tokens": 5},
    "eval": {"max_new_tokens": 5},
    "orchestration": {"schedule": "0 3 * * *"},
}


def _recipe_file(directory: Path) -> Path:
    path = directory / "served-rest.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_deployment_parameter_schema_is_the_recipe(tmp_path):
    """Pure: the deployment's parameter is the Recipe model, every field with its description."""
    recipe = load_recipe(_recipe_file(tmp_path))
    (dep,) = build_deployments([recipe])
    assert (dep.flow_name, dep.name, dep.entrypoint) == ("rest", "served-rest", "flows.rest.rest")
    assert dep.schedules[0].schedule.cron == "0 3 * * *"
    assert dep.parameters == {"recipe": recipe.model_dump(mode="json")}
    assert dep.enforce_parameter_schema
    schema = dep._parameter_openapi_schema.model_dump()
    assert schema["properties"]["recipe"]["$ref"] == "#/definitions/Recipe"
    defs = schema["definitions"]
    top = defs["Recipe"]["properties"]
    assert set(top) == set(Recipe.model_fields)
    assert defs["Recipe"]["additionalProperties"] is False  # extra="forbid" reaches the form
    for name, field in Recipe.model_fields.items():
        assert top[name]["description"] == field.description, name
    grow = defs["GrowConfig"]["properties"]["samples_per_prompt"]
    assert grow["description"].startswith("N, completions") and grow["minimum"] == 1
    assert defs["OrchestrationConfig"]["properties"]["runner"]["enum"] == ["thread", "ray"]


def test_two_algorithms_and_bad_schedules(tmp_path):
    from alignment.recipe import RecipeError

    rest = load_recipe(_recipe_file(tmp_path))
    dpo = rest.model_copy(update={"name": "served-dpo", "algorithm": "iterative_dpo"})
    assert [d.flow_name for d in build_deployments([rest, dpo])] == ["rest", "iterative-dpo"]
    # What `flywheel serve` deploys given no files: every shipped recipe, each on its algorithm's flow.
    from flows.serve import default_recipe_files

    shipped = build_deployments([load_recipe(f) for f in default_recipe_files(Path(__file__).resolve().parents[1] / "recipes")])
    assert {d.name: d.flow_name for d in shipped} == {
        "arithmetic-rest": "rest", "wordmath-rest": "rest", "arithmetic-dpo": "iterative-dpo", "arithmetic-grpo": "grpo",
        "wordmath-grpo": "grpo"}  # fmt: skip
    with pytest.raises(RecipeError, match="unique"):
        build_deployments([rest, rest])
    bad = load_recipe(_recipe_file(tmp_path), ["orchestration.schedule=every day"])
    with pytest.raises(RecipeError, match="not a valid cron expression"):
        build_deployments([bad])


def test_server_enforces_the_recipe_schema(api, tmp_path):
    """A run whose recipe breaks the schema (N = 0, an unknown key, an unknown runner) is refused by the server."""
    from prefect.client.orchestration import get_client

    (dep,) = build_deployments([load_recipe(_recipe_file(tmp_path))])
    deployment_id = dep.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
        assert stored.schedules[0].schedule.cron == "0 3 * * *"
        assert "description" in stored.parameter_openapi_schema["definitions"]["GrowConfig"]["properties"]["shards"]
        broken = [
            {**RECIPE, "grow": {"samples_per_prompt": 0}},
            {**RECIPE, "grwo_steps": 2},
            {**RECIPE, "orchestration": {"runner": "dask"}},
        ]
        for recipe in broken:
            with pytest.raises(Exception, match="409|422|[Vv]alidation"):
                client.create_flow_run_from_deployment(deployment_id, parameters={"recipe": recipe})
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"recipe": {**RECIPE, "grow_steps": 1}})
        assert run.parameters["recipe"]["grow_steps"] == 1  # a valid edit is accepted (and waits for a worker)
        client.delete_flow_run(run.id)


def _wait_for_deployment(name: str, serve: subprocess.Popen, log: Path, timeout: float = 240):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert serve.poll() is None, f"flywheel serve exited:\n{log.read_text()[-4000:]}"
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(1)
    raise AssertionError(f"deployment {name} was not registered within {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_served_deployment_runs_from_the_api(api, s3_lake, workdir):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.deployments import run_deployment

    from tasks.lake import Lake

    recipe_file = _recipe_file(workdir)
    log = workdir / "serve.log"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(workdir / "prefect-client")}
    with log.open("wb") as fh:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(recipe_file)], cwd=workdir, env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu", limit=1))
        _wait_for_deployment("rest/served-rest", serve, log)
        # What the UI's "Custom run" form sends: the whole recipe, some fields edited.
        edited = load_recipe(recipe_file).model_dump(mode="json")
        edited["grow_steps"] = 1
        edited["grow"].update(samples_per_prompt=2, shards=2)
        edited["lake"] = s3_lake
        edited["mlflow"]["tracking_uri"] = f"sqlite:///{workdir / 'tracking' / 'mlflow.db'}"
        run = run_deployment("rest/served-rest", parameters={"recipe": edited, "run_name": "from-api"}, timeout=900, poll_interval=2)
        assert run.state.is_completed(), f"{run.state}:\n{log.read_text()[-6000:]}"
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0
    finally:
        stop_process(serve)

    lake = Lake(s3_lake)
    samples = lake.read(lake.stage_uri("from-api", 1, "samples"))
    own = samples.filter(samples["sample_idx"] >= 0)
    assert own.height == 60 * 2 and own["sample_idx"].max() == 1  # the edited N, not the recipe file's 4
    assert len(lake.manifest(lake.stage_uri("from-api", 1, "samples")).files) == 3  # 2 Grow shards + labelled
    assert lake.is_done(lake.stage_uri("from-api", 1, "scored"))
    summary = lake.get_json(f"{s3_lake}/runs/from-api/summary.json")
    assert [r["iteration"] for r in summary["iterations"]] == [1]  # grow_steps edited from 2 to 1
    tracking = f"sqlite:///{workdir / 'tracking' / 'mlflow.db'}"
    versions = MlflowClient(tracking, registry_uri=tracking).search_model_versions("name='served-rest'")
    numbers = {str(v.version) for v in versions}
    assert numbers >= {"1", "2"}  # the warm start and the Grow step's model
    assert str(summary["iterations"][0]["model_version"]) in numbers


ROOT = Path(__file__).resolve().parent.parent


def test_prefect_yaml_recipes_are_valid():
    """Every deployment in infra/prefect.yaml parses as Prefect reads it, with a valid recipe whose stages go
    to stage deployments of the same file: GPU stages to the GPU pool, the orchestrating flows on CPU."""
    from prefect.cli.deploy._models import PrefectYamlModel

    doc = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text()))
    stage_pools = {f"flywheel-stage/{d.name}": d.work_pool.name for d in doc.deployments if d.entrypoint == "flows/stage.py:stage"}
    assert stage_pools == {"flywheel-stage/gpu": "flywheel-gpu", "flywheel-stage/cpu": "flywheel-cpu"}
    for dep in doc.deployments:
        if dep.entrypoint == "flows/stage.py:stage":
            continue
        recipe = Recipe.model_validate(dep.parameters["recipe"])
        assert dep.entrypoint == f"flows/{recipe.algorithm}.py:{recipe.algorithm}"  # the flow the algorithm names
        assert dep.work_pool.name == "flywheel-cpu"
        placed = {stage: stage_pools[name] for stage, name in recipe.orchestration.stage_deployments.items()}
        if placed:
            assert {s for s, pool in placed.items() if pool == "flywheel-gpu"} >= {"grow", "train", "evaluate"}
            assert placed["score"] == placed["filter"] == "flywheel-cpu"


def test_prefect_deploy_registers_the_work_pool_deployments(api, tmp_path):
    """`prefect deploy --prefect-file infra/prefect.yaml --all` against the real server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        for pool in ("flywheel-cpu", "flywheel-gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-cli"), "FLYWHEEL_HOME": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with get_client(sync_client=True) as client:
        rest = client.read_deployment_by_name("rest/arithmetic-rest")
        assert rest.work_pool_name == "flywheel-cpu" and rest.enforce_parameter_schema
        assert rest.schedules[0].schedule.cron == "0 3 * * *" and not rest.schedules[0].active
        assert rest.parameters["recipe"]["lake"] == "s3://lake/flywheel"
        assert rest.parameters["recipe"]["orchestration"]["gpu_concurrency_limit"] == "gpu-{host}-{gpu}"
        assert rest.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
        props = rest.parameter_openapi_schema["definitions"]["GrowConfig"]["properties"]
        assert props["shards"]["description"].startswith("Split prompts")
        assert rest.parameters["recipe"]["orchestration"]["stage_deployments"]["grow"] == "flywheel-stage/gpu"
        assert client.read_deployment_by_name("flywheel-stage/gpu").work_pool_name == "flywheel-gpu"
        assert client.read_deployment_by_name("flywheel-stage/cpu").work_pool_name == "flywheel-cpu"
        stage_schema = client.read_deployment_by_name("flywheel-stage/gpu").parameter_openapi_schema
        assert stage_schema["properties"]["stage"]["enum"] == ["grow", "score", "filter", "pair", "train", "evaluate"]
        assert client.read_deployment_by_name("iterative-dpo/arithmetic-dpo").work_pool_name == "flywheel-cpu"
        assert client.read_deployment_by_name("rest/arithmetic-rest-cpu").work_pool_name == "flywheel-cpu"


def test_serve_without_a_server_says_what_to_start(workdir):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from alignment.recipe import RecipeError
    from flows.serve import use_prefect_server

    with temporary_settings({PREFECT_API_URL: None}):
        with pytest.raises(RecipeError, match="flywheel stack up"):
            use_prefect_server()
