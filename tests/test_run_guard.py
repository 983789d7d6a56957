"""What keeps a run whole, through the real CLI: names, identity, one writer, verified reads.

- Two ``flywheel run`` processes started together with one ``--run-name``: exactly one runs (one model
  version per step), the other exits 2 with one ``flywheel:`` sentence naming the run and its holder.
- Resuming that run with a changed reward, filter threshold or prompt count is refused before
  anything runs, naming the changed keys; a change to a key that may change on resume is accepted.
- A part swapped for another valid part, or truncated, is one sentence naming the part.
- Run names with ``..``, ``/``, ``iteration=`` or 300 characters, and a bad model name, are refused.
- Ctrl-C stops a run within seconds with one line saying how to resume it, and the resume finishes.

Run: ``.venv/bin/python -m pytest tests/test_run_guard.py -q`` (about two minutes on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flywheel_helpers import RECIPE, flywheel, one_torch_thread, versions_of  # noqa: F401 (autouse)
from tests.test_bad_input import cli_error

ROOT = Path(__file__).resolve().parents[1]
# The smallest run that commits every input stage, a warm start and a baseline (~20 s on one core).
TINY = [
    "task.n_labelled=20", "task.n_prompts=10", "task.n_eval=10", "warm_start.epochs=1", "grow_steps=0",
    "filter.kind=fixed", "filter.threshold=0.5", "grow.samples_per_prompt=2",
]
RUN = "guarded"


def _launch(cwd: Path, tag: str, *sets: str, run: str = RUN) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", run, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out, err = (cwd / f"{tag}.stdout").open("wb"), (cwd / f"{tag}.stderr").open("wb")
    return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        raise


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Two runs with one name started together, in a fresh folder: their exit codes (first launched first)."""
    cwd = tmp_path_factory.mktemp("guarded")
    procs = [_launch(cwd, "a", *TINY), _launch(cwd, "b", *TINY)]
    return cwd, [_finish(p) for p in procs]


def _copy(guarded: tuple[Path, list[int]], dest: Path) -> Path:
    """A private copy of the finished run's lake and MLflow, for a test that damages or resumes it."""
    src, codes = guarded
    assert sorted(codes) == [0, 2], codes
    for name in ("lake", "mlflow"):
        shutil.copytree(src / name, dest / name)
    return dest / "lake"


def test_two_writers_with_one_name_exactly_one_runs(guarded):
    cwd, codes = guarded
    assert sorted(codes) == [0, 2], codes
    loser = "ab"[codes.index(2)]
    message = cli_error((cwd / f"{loser}.stderr").read_text())
    assert f"Run '{RUN}'" in message and "being written by another process" in message and "--run-name" in message
    assert (cwd / f"{loser}.stdout").read_text() == ""
    # The winner ran alone: one model version (the baseline) and a released lease.
    assert [(v.tags["flywheel.iteration"], v.tags["flywheel.step"]) for v in versions_of(cwd)] == [("0", "0")]
    assert '"released": true' in (cwd / "lake" / "runs" / RUN / "lease.json").read_text()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["reward=contains_reference"], ["reward"]),
        (["filter.threshold=0.75"], ["filter.threshold"]),
        (["task.n_prompts=12", "reward=contains_reference"], ["reward", "task.n_prompts"]),
    ],
    ids=["reward", "threshold", "prompt-count"],
)
def test_resume_with_a_changed_recipe_is_refused(guarded, workdir, change, named):
    lake = _copy(guarded, workdir)
    before = sorted(p.relative_to(lake).as_posix() for p in lake.rglob("*"))
    rc = _finish(_launch(workdir, "changed", *TINY, *change))
    err = (workdir / "changed.stderr").read_text()
    assert rc == 2, err[-3000:]
    message = cli_error(err)
    assert f"Run '{RUN}' was created with a different recipe (changed: {', '.join(named)})" in message
    assert "another --run-name" in message
    assert (workdir / "changed.stdout").read_text() == ""
    # Refused from the lake's records alone: no lease taken, no server started, nothing written.
    assert sorted(p.relative_to(lake).as_posix() for p in lake.rglob("*")) == before
    log = workdir / ".flywheel" / "logs" / f"{RUN}.log"
    assert not log.exists() or "Starting temporary server" not in log.read_text()
    assert [str(v.version) for v in versions_of(workdir)] == ["1"]


def test_resume_changing_only_resumable_keys_is_accepted(guarded, workdir):
    _copy(guarded, workdir)
    rc = _finish(_launch(workdir, "resume", *TINY, "grow.batch_size=3", "eval.patience=4", "eval.batch_size=5"))
    assert rc == 0, (workdir / "resume.stderr").read_text()[-3000:]
    assert [str(v.version) for v in versions_of(workdir)] == ["1"]  # replayed, not registered again


def _damage(lake: Path, how: str) -> Path:
    part = lake / "prompts" / f"run={RUN}" / "iteration=0" / "part-00000.parquet"
    if how == "swapped":  # another valid part of the same run: same schema, other rows
        shutil.copyfile(lake / "eval_prompts" / f"run={RUN}" / "iteration=0" / "part-00000.parquet", part)
    else:
        data = part.read_bytes()
        part.write_bytes(data[: len(data) // 2])
    return part


@pytest.mark.parametrize("how", ["swapped", "truncated"])
def test_a_damaged_part_is_one_sentence_naming_it(guarded, workdir, capsys, how):
    lake = _copy(guarded, workdir)
    part = _damage(lake, how)
    rc = _cli(["inspect", f"file://{lake}/prompts/run={RUN}/iteration=0"])
    message = cli_error(capsys.readouterr().err)
    assert rc == 2
    assert f"Part file://{part}" in message and "delete" in message and "_manifest.json" in message, message


@pytest.mark.parametrize("how", ["swapped", "truncated"])
def test_a_resumed_run_refuses_a_damaged_part(guarded, workdir, how):
    lake = _copy(guarded, workdir)
    part = _damage(lake, how)
    rc = _finish(_launch(workdir, "resume", *TINY, "grow_steps=1"))  # Grow reads the prompts, inside the flow
    err = (workdir / "resume.stderr").read_text()
    assert rc == 1, err[-3000:]  # found once the run was working
    # Inside a flow Prefect logs the failed task on its own; the CLI's verdict is the one flywheel line.
    lines = [line for line in err.splitlines() if line.startswith("flywheel:")]
    assert len(lines) == 1 and f"Part file://{part}" in lines[0], err[-3000:]
    assert not (lake / "runs" / RUN / "stages" / "samples" / "iteration=1" / "_manifest.json").exists()
    assert not (lake / "samples" / f"run={RUN}").exists()


def _cli(argv: list[str]) -> int:
    from flows.cli import main

    return main(argv)


@pytest.mark.parametrize(
    ("sets", "name", "rule"),
    [
        ([], "../../escaped", "contains '..'"),
        ([], "x/y", "contains '/'"),
        ([], "x/iteration=9", "contains '/', '='"),
        ([], "iteration=9", "contains '='"),
        ([], "a" * 300, "is 300 characters long"),
        (["mlflow.model_name=team/model"], "fine", "The mlflow.model_name 'team/model' contains '/'"),
    ],
    ids=["dotdot", "slash", "partition", "iteration=", "300-chars", "model-name"],
)
def test_bad_names_are_refused_before_anything_runs(workdir, capsys, sets, name, rule):
    started = time.monotonic()
    rc = flywheel(RECIPE, *TINY, *sets, run=name)
    message = cli_error(capsys.readouterr().err)
    assert rc == 2
    assert rule in message and "1 to 128 letters, digits" in message, message
    assert not (workdir / "lake").exists() and not (workdir.parent / "escaped").exists()
    assert time.monotonic() - started < 30  # refused before Prefect or any model starts


# -- the lease itself, on both stores (no flow: fast) ------------------------------------------------
@pytest.fixture(params=["file", "s3"])
def any_lake(request, tmp_path):
    from tasks.lake import Lake

    return Lake(str(tmp_path / "lake") if request.param == "file" else request.getfixturevalue("s3_lake"))


def test_the_lease_admits_one_holder_and_frees_on_release_or_expiry(any_lake):
    import json

    from tasks.lake import LEASE_FILE, RunBusy, RunLease

    first = RunLease(any_lake, "r")
    first.acquire()
    with pytest.raises(RunBusy, match="being written by another process"):
        RunLease(any_lake, "r").acquire()
    first.release()
    second = RunLease(any_lake, "r")
    second.acquire()  # released: free at once
    second._stop.set()  # a holder that stops renewing (frozen or killed on another machine)...
    uri = f"{any_lake.run_uri('r')}/{LEASE_FILE}"
    doc = json.loads(any_lake.store.get(uri))
    expired = json.dumps({**doc, "host": "elsewhere", "expires_at": time.time() - 1}).encode()
    assert any_lake.store.put_if_unchanged(uri, expired, second._written)
    third = RunLease(any_lake, "r")
    third.acquire()  # ...is taken over once its lease has expired
    assert second._swap(second._doc()) is False and second.lost  # and never overwrites the new holder's lease
    assert json.loads(any_lake.store.get(uri))["owner"] == third.owner
    third.release()


def test_conditional_writes_are_exclusive(any_lake):
    from concurrent.futures import ThreadPoolExecutor

    uri = f"{any_lake.uri}/x/_lease.json"
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: any_lake.store.put_if_absent(uri, f"{i}".encode()), range(8)))
    assert created.count(True) == 1
    current = any_lake.store.get(uri)
    with ThreadPoolExecutor(8) as pool:
        swapped = list(pool.map(lambda i: any_lake.store.put_if_unchanged(uri, f"new{i}".encode(), current), range(8)))
    assert swapped.count(True) == 1
    assert any_lake.store.get(uri) == f"new{swapped.index(True)}".encode()


def test_ctrl_c_stops_within_seconds_and_the_run_resumes(tmp_path):
    import signal

    first = _launch(tmp_path, "interrupted", *TINY, "grow_steps=1", run="stopped")
    summary = tmp_path / "lake" / "runs" / "stopped" / "summary.json"
    deadline = time.monotonic() + 300
    while not summary.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the baseline is registered: the run is inside its flow
    assert first.poll() is None, (tmp_path / "interrupted.stderr").read_text()[-3000:]
    sent = time.monotonic()
    first.send_signal(signal.SIGINT)
    assert _finish(first, timeout=30) == 130
    assert time.monotonic() - sent < 15
    err = (tmp_path / "interrupted.stderr").read_text()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flywheel:")]
    assert lines == ["flywheel: stopped by SIGINT; run 'stopped' keeps every stage it committed: "
                     "resume it with the same recipe and --run-name stopped."]
    assert '"released": true' in (tmp_path / "lake" / "runs" / "stopped" / "lease.json").read_text()
    rc = _finish(_launch(tmp_path, "resumed", *TINY, "grow_steps=1", run="stopped"))
    assert rc == 0, (tmp_path / "resumed.stderr").read_text()[-3000:]
