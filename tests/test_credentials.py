"""Failures a person must fix, on a real S3 server: one sentence, exit code 2, no damage, no secrets.

``flywheel run`` with wrong credentials, a missing bucket or a stopped S3 server stops before its
flow starts with exactly one line on stderr, and the existing run it was asked to resume is left
byte for byte as it was (fast; the existing run is written through the lake). The slow test stops
the server in the middle of a real run, checks that its sentence says the same (with exit code 1, and how
to resume: the run was working), proves the same failures harmless
on that run's data, and resumes it to the end on the restarted server.

Run: ``.venv/bin/python -m pytest tests/test_credentials.py -q`` (skipped without the ``weed`` binary).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from infra.seaweed import SeaweedServer, start_seaweed
from tasks.lake import Lake
from tasks.lake import S3Store
from tests.s3_fixtures import _FOREIGN_AWS_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
RUN = "existing"
SMALL = [
    "task.n_prompts=100", "task.n_eval=50", "task.n_labelled=100", "warm_start.epochs=4", "grow_steps=2",
    "grow.samples_per_prompt=4", "improve.epochs=2", "eval.patience=5",
]


def _env(server: SeaweedServer, **changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_AWS_SETTINGS} | server.aws_env()
    env.pop("AWS_ENDPOINT_URL")  # the recipe's s3.endpoint_url is the only endpoint
    return env | changes


def _flywheel_run(lake: str, endpoint: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", RUN, *[a for s in SMALL for a in ("--set", s)],
           "--set", f"lake={lake}", "--set", f"s3.endpoint_url={endpoint}"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _snapshot(store: S3Store, bucket: str) -> dict[str, bytes]:
    return {uri: store.get(uri) for uri in store.list(f"s3://{bucket}")}


def _write_existing_run(lake: Lake, tmp_path: Path) -> None:
    frame = pl.DataFrame({"prompt_id": [0, 1], "prompt": ["1+1=", "2+2="], "completion": ["2", "5"], "reward": [1.0, 0.0]})
    scored = lake.stage_uri(RUN, 1, "scored")
    lake.write_stage(lake.stage_uri(RUN, 1, "samples"), [frame.drop("reward")])
    lake.write_stage(scored, [frame], parents=[lake.stage_uri(RUN, 1, "samples")])
    lake.write_stage(lake.stage_uri(RUN, 1, "filtered", 1), [frame.head(1)], parents=[scored])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    lake.put_dir(tmp_path / "ckpt", lake.stage_uri(RUN, 1, "checkpoint", 1))
    lake.put_json(f"{lake.run_uri(RUN)}/summary.json", {"run": RUN, "iterations": []})


def _assert_one_sentence(proc: subprocess.CompletedProcess, sentence: str, *secrets_: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [f"flywheel: {sentence}"]
    assert proc.stdout == ""
    for secret in secrets_:
        assert secret not in proc.stderr


@pytest.fixture
def existing(s3_server: SeaweedServer, s3_lake: str, tmp_path: Path):
    """An existing run's data in ``s3_lake``, and a way to check it is byte for byte unchanged."""
    store = S3Store(endpoint_url=s3_server.endpoint_url)
    _write_existing_run(Lake(s3_lake, {"endpoint_url": s3_server.endpoint_url}), tmp_path)
    bucket = s3_lake[len("s3://"):].split("/", 1)[0]
    before = _snapshot(store, bucket)
    yield s3_lake
    assert _snapshot(store, bucket) == before
    # No run was started: no tracking database, no model cache (the console's log folder may exist).
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / ".flywheel" / "cache").exists()


def test_wrong_credentials_are_one_sentence(existing: str, s3_server: SeaweedServer, tmp_path: Path) -> None:
    wrong = f"wrong-{secrets.token_hex(12)}"
    proc = _flywheel_run(existing, s3_server.endpoint_url, _env(s3_server, AWS_SECRET_ACCESS_KEY=wrong), tmp_path)
    _assert_one_sentence(proc, f"S3 refused the credentials for {existing}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                         " (and AWS_SESSION_TOKEN or the AWS profile, if you use them).",
                         wrong, s3_server.secret_key, s3_server.access_key)

    unknown = f"nobody-{secrets.token_hex(6)}"
    proc = _flywheel_run(existing, s3_server.endpoint_url, _env(s3_server, AWS_ACCESS_KEY_ID=unknown), tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "refused the credentials" in proc.stderr
    assert unknown not in proc.stderr and s3_server.secret_key not in proc.stderr


def test_missing_bucket_is_one_sentence(existing: str, s3_server: SeaweedServer, tmp_path: Path) -> None:
    missing = f"no-such-bucket-{secrets.token_hex(4)}"
    proc = _flywheel_run(f"s3://{missing}/lake", s3_server.endpoint_url, _env(s3_server), tmp_path)
    _assert_one_sentence(proc, f"Bucket '{missing}' does not exist at {s3_server.endpoint_url}: create it or fix the lake URI.",
                         s3_server.secret_key)


def test_stopped_server_is_one_sentence(existing: str, s3_server: SeaweedServer, tmp_path: Path) -> None:
    stopped = start_seaweed(tmp_path / "stopped", access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                            die_with_parent=True)
    stopped.stop(timeout=2)
    started = time.monotonic()
    proc = _flywheel_run(existing, stopped.endpoint_url, _env(s3_server), tmp_path)
    _assert_one_sentence(proc, f"Cannot reach the S3 endpoint {stopped.endpoint_url}: is the server running?",
                         s3_server.secret_key)
    assert time.monotonic() - started < 120  # seconds of retries, not minutes


@pytest.mark.slow
def test_server_stopped_mid_run_then_failures_then_resume(s3_server: SeaweedServer, tmp_path: Path) -> None:
    """A real run loses its S3 server during Grow: one sentence; then nothing harms its data; then it resumes."""
    creds = {"access_key": f"mid-{secrets.token_hex(4)}", "secret_key": secrets.token_urlsafe(30)}
    server = start_seaweed(tmp_path / "seaweed", die_with_parent=True, **creds)
    try:
        server.create_bucket("lake")
        lake_uri = "s3://lake/lake"
        cmd_env = _env(server)
        cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", RUN,
               *[a for s in SMALL for a in ("--set", s)], "--set", f"lake={lake_uri}",
               "--set", f"s3.endpoint_url={server.endpoint_url}"]
        err = tmp_path / "first.stderr"
        with err.open("w") as fh:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=cmd_env, stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
        store = S3Store(endpoint_url=server.endpoint_url)
        deadline = time.monotonic() + 900
        with pytest.MonkeyPatch.context() as mp:
            for name, value in server.aws_env().items():
                mp.setenv(name, value)
            while not store.exists(f"{lake_uri}/runs/{RUN}/summary.json"):  # the warm start is done and registered
                assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.2)
        server.stop(timeout=5)
        assert proc.wait(timeout=600) == 1, err.read_text()[-3000:]  # the run was working: exit 1
        lines = err.read_text().splitlines()
        sentence = f"Cannot reach the S3 endpoint {server.endpoint_url} (is the server running?); then resume it"
        assert len(lines) == 1 and lines[0].startswith(f"flywheel: run {RUN} stopped in ") and sentence in lines[0], lines

        server = start_seaweed(tmp_path / "seaweed", die_with_parent=True, **creds)  # same data, a new port
        store = S3Store(endpoint_url=server.endpoint_url)
        with pytest.MonkeyPatch.context() as mp:
            for name, value in server.aws_env().items():
                mp.setenv(name, value)
            before = _snapshot(store, "lake")
            assert not Lake(lake_uri).is_done(Lake(lake_uri).stage_uri(RUN, 1, "scored"))
            wrong = _env(server, AWS_SECRET_ACCESS_KEY="wrong-" + secrets.token_hex(8))
            assert _flywheel_run(lake_uri, server.endpoint_url, wrong, tmp_path).returncode == 2
            assert _flywheel_run("s3://missing/lake", server.endpoint_url, _env(server), tmp_path).returncode == 2
            assert _flywheel_run(lake_uri, "http://127.0.0.1:9", _env(server), tmp_path).returncode == 2
            assert _snapshot(store, "lake") == before

            done = _flywheel_run(lake_uri, server.endpoint_url, _env(server), tmp_path, timeout=1500)
            assert done.returncode == 0, done.stderr[-3000:]
            lake = Lake(lake_uri)
            for g in (1, 2):
                for stage, step in (("samples", None), ("scored", None), ("filtered", 1), ("eval", 1), ("checkpoint", 1)):
                    assert lake.is_done(lake.stage_uri(RUN, g, stage, step))
            assert lake.get_json(f"{lake.run_uri(RUN)}/summary.json")["stopped"] == "completed all Grow steps"
            for secret in creds.values():
                assert secret not in done.stdout + done.stderr + err.read_text()
    finally:
        server.stop(timeout=3)
