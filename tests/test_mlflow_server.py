"""Tracking and the registry against a real ``mlflow server``, the way the stack and production run.

MLflow's SQLite store accepts requests its tracking server refuses (a ``models:/`` version source
without ``model_id``), so the embedded default's tests cannot vouch for the server. Here
``flywheel run`` runs as a subprocess, as users run it, with ``mlflow.tracking_uri`` pointing at a
server started on a free loopback port (SQLite backend, proxied artifacts in a temporary folder).

Run: ``.venv/bin/python -m pytest tests/test_mlflow_server.py -q``
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.stack import http_ok
from tests.flywheel_helpers import FAST, MODEL, RECIPE
from tests.prefect_fixtures import free_port

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
MLFLOW = str(Path(sys.executable).parent / "mlflow")
# One Grow step: the baseline and one improved version are enough to see registration and the alias.
SMALL = [*FAST, "grow_steps=1"]


def cli_env(tmp: Path) -> dict[str, str]:
    """The subprocess's own Prefect home, so its embedded API shares no database with this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp / "prefect"), OMP_NUM_THREADS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free loopback port; its URL. Stopped, with its workers, after the module."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts")],
        cwd=home, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not http_ok(f"{url}/health"):
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server leads its own group: its workers stop with it
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def server_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``flywheel run`` of the demo recipe, small, tracked on the server; its summary."""
    work = tmp_path_factory.mktemp("server-run")
    argv = [FLYWHEEL, "run", str(RECIPE), "--run-name", "on-server", "--set", f"mlflow.tracking_uri={mlflow_server}"]
    for s in SMALL:
        argv += ["--set", s]
    proc = subprocess.run(argv, cwd=work, env=cli_env(work), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((work / "lake" / "runs" / "on-server" / "summary.json").read_text()) | {"workdir": str(work)}


@pytest.fixture
def client(mlflow_server: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


def test_versions_lineage_and_champion_on_the_server(server_run, client):
    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    for v in versions:
        assert v.tags["flywheel.run"] == "on-server"
        assert v.tags["flywheel.checkpoint"].startswith("file://") and len(v.tags["flywheel.checkpoint_sha256"]) == 64
        lineage = json.loads(v.tags["flywheel.datasets"])
        assert lineage and all(d["uri"].startswith("file://") and len(d["sha256"]) == 64 for d in lineage)
        assert v.source.startswith("models:/m-")  # the logged model, which the server wants named by model_id
    assert versions[1].tags["flywheel.parent_version"] == "1"
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == server_run["champion"]["version"]


def test_champion_pyfunc_takes_inference_params(server_run, client):
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    params = {p.name: p.default for p in model.metadata.signature.params}
    assert params == {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    short = model.predict(["12+7=", "3+4="], params={"max_new_tokens": 1})
    # Sampling is seeded: the same seed gives the same completions.
    hot = {"max_new_tokens": 4, "temperature": 1.0, "seed": 3}
    assert model.predict(["12+7=", "3+4="], params=hot) == model.predict(["12+7=", "3+4="], params=hot)
    assert len(short) == 2 and all(isinstance(c, str) and len(c) <= 1 for c in short)
    assert len(model.predict(["12+7="], params={"max_new_tokens": 3})[0]) <= 3


def test_end_tracking_ends_parent_and_iteration_runs(server_run, client):
    from alignment.recipe import load_recipe
    from tasks.tracking.registry import ERROR_TAG, end_tracking, start_tracking

    recipe = load_recipe(RECIPE, [*SMALL, f"mlflow.tracking_uri={client.tracking_uri}"])
    work = Path(server_run["workdir"])
    ref_args = {"run": "on-server", "lake": server_run["lake"], "recipe": recipe, "cache_dir": str(work / "cache")}
    from tasks.context import RunRef

    parent_id = start_tracking.fn(RunRef(**ref_args))  # found again, not created
    ref = RunRef(**ref_args, mlflow_run_id=parent_id)
    nested = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    by_iteration = {int(r.data.tags["flywheel.iteration"]): r.info.run_id for r in nested}
    assert sorted(by_iteration) == [0, 1]

    end_tracking(ref, "FAILED", "Grow ran out of memory.")
    parent = client.get_run(parent_id)
    assert (parent.info.status, parent.data.tags[ERROR_TAG]) == ("FAILED", "Grow ran out of memory.")
    assert client.get_run(by_iteration[1]).info.status == "FAILED"
    assert client.get_run(by_iteration[0]).info.status == "FINISHED"
    assert ERROR_TAG not in client.get_run(by_iteration[0]).data.tags

    start_tracking.fn(RunRef(**ref_args))  # a resumed run reopens its parent run
    parent = client.get_run(parent_id)
    assert parent.info.status == "RUNNING" and ERROR_TAG not in parent.data.tags

    end_tracking(ref, "FINISHED")
    assert {client.get_run(r).info.status for r in [parent_id, *by_iteration.values()]} == {"FINISHED"}
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        end_tracking(ref, "DONE")


def test_unreachable_tracking_server_is_one_sentence_within_30_s(tmp_path):
    closed = free_port()  # bound and released: nothing listens there
    argv = [FLYWHEEL, "run", str(RECIPE), "--run-name", "nowhere", "--set", f"mlflow.tracking_uri=http://127.0.0.1:{closed}"]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 30, elapsed
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("flywheel: "), lines
    assert f"127.0.0.1:{closed}" in lines[0] and "cannot be reached" in lines[0]
