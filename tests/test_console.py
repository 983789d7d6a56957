"""What ``flywheel run`` prints, as a person sees it in a terminal: the real command, as a subprocess.

A clean run prints one line per stage, then the per-step table and where the log, the lake, the
MLflow run and the champion are; no ERROR, no traceback, no warning. Prefect's per-task lines go to
``.flywheel/logs/RUN.log``; ``--verbose`` prints them too. The run ends its MLflow parent run
FINISHED and leaves a summary that names it.

Run: ``.venv/bin/python -m pytest tests/test_console.py -q``
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flywheel_helpers import FAST, RECIPE
from tests.test_mlflow_server import cli_env

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
WHERE = ("champion", "log", "lake", "summary", "mlflow")
NOISE = re.compile(r"ERROR|Traceback|warning", re.IGNORECASE)


def run_cli(workdir: Path, run: str, *extra: str, sets: list[str] = FAST, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = [FLYWHEEL, "run", str(RECIPE), "--run-name", run, *extra]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run(argv, cwd=workdir, env=cli_env(workdir) | (env or {}), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The demo, small, as a person runs it; training reports its progress every 0.3 s instead of every minute."""
    work = tmp_path_factory.mktemp("console")
    return work, run_cli(work, "quiet", env={"FLYWHEEL_PROGRESS_SECONDS": "0.3"})


def test_a_clean_run_prints_stages_table_and_where_without_noise(quiet):
    work, proc = quiet
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert [line for line in out.splitlines() if NOISE.search(line)] == []
    assert proc.stderr == ""  # not even MLflow's INFO lines on creating this run's fresh tracking database
    assert "Task run '" not in out and "Finished in state" not in out  # Prefect's lines are in the log
    lines = proc.stdout.splitlines()
    # One line per stage, with its time: "filter g=1 step 1: tau=... kept 40 of 280 (...) · 0.1 s"
    stage = [line for line in lines if re.search(r" · \d+\.\d s$", line)]
    assert any(line.startswith("filter g=1 step 1:") for line in stage), lines
    assert any(line.startswith("grow g=2") for line in stage), lines
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["iter", "step"])
    assert lines[header].split() == ["iter", "step", "tau", "samples", "kept", "eval_reward", "accuracy", "version"]
    where = {key: line for line in lines[header:] for key in WHERE if line.startswith(f"{key}:")}
    assert set(where) == set(WHERE), lines[header:]
    log = work / ".flywheel" / "logs" / "quiet.log"
    assert str(log.relative_to(work)) in where["log"]
    text = log.read_text()
    assert "Task run '" in text and "Finished in state Completed()" in text and "Stopping temporary server" in text
    assert "Creating initial MLflow database tables" in text
    assert "lake/runs/quiet" in where["lake"] and where["champion"].startswith("champion: models:/arithmetic-rest@champion = version")


def test_long_training_says_how_far_it_is(quiet):
    """Where no bar is drawn (a log, a pipe, the Prefect UI), a training stage reports its steps, its loss and
    the time left at the set interval; the stage's closing line follows them."""
    _, proc = quiet
    lines = proc.stdout.splitlines()
    progress = [re.fullmatch(r"warm-start · (\d+) of (\d+) steps, loss [\d.]+, about \d+ s left · \d+\.\d s", line) for line in lines]
    steps = [(int(m[1]), int(m[2])) for m in progress if m]
    assert len(steps) >= 2, lines
    assert {total for _, total in steps} == {7 * 25}  # 100 labelled rows in steps of 16, 25 epochs
    assert [step for step, _ in steps] == sorted({step for step, _ in steps}) and steps[-1][0] < 175
    done = next(i for i, line in enumerate(lines) if line.startswith("warm-start · trained"))
    assert done > max(i for i, m in enumerate(progress) if m)


def test_sampling_and_the_reference_pass_say_how_far_they_are(tmp_path):
    """Iterative DPO through the CLI (35 s): Grow reports the samples drawn, the pair stage the reference policy's
    pass over the pairs, before training starts, and training its steps and its closing pass (completions scored,
    64 a batch)."""
    argv = [FLYWHEEL, "run", str(RECIPE.with_name("arithmetic-dpo.yaml")), "--run-name", "progress",
            "--set", "task.n_eval=40", "--set", "grow_steps=1"]
    proc = subprocess.run(argv, cwd=tmp_path, env=cli_env(tmp_path) | {"FLYWHEEL_PROGRESS_SECONDS": "0.01"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    grow = [ln for ln in lines if re.fullmatch(r"grow-shard · \d+ of \d+ samples, about \d+ s left · [\d.]+ s", ln)]
    scored = [ln for ln in lines if re.fullmatch(r"train-preference · \d+ of \d+ completions scored, about \d+ s left · [\d.]+ s", ln)]
    reference = [i for i, ln in enumerate(lines) if re.fullmatch(r"pair · \d+ of \d+ completions scored, about \d+ s left · [\d.]+ s", ln)]
    steps = [i for i, ln in enumerate(lines) if ln.startswith("train-preference · 1 of ")]
    assert grow and scored and reference and steps and max(reference) < steps[0], lines


def test_the_run_ends_its_mlflow_runs_and_names_them_in_the_summary(quiet):
    from mlflow import MlflowClient

    work, proc = quiet
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "lake" / "runs" / "quiet" / "summary.json").read_text())
    tracking = summary["mlflow"]
    assert tracking["tracking_uri"] == "sqlite:///mlflow/mlflow.db" and tracking["run_id"] in proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    parent = client.get_run(tracking["run_id"])
    assert parent.info.status == "FINISHED"
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{tracking['run_id']}'")
    assert len(nested) == 3 and {r.info.status for r in nested} == {"FINISHED"}  # warm start + 2 iterations


def test_verbose_prints_prefects_lines(tmp_path):
    proc = run_cli(tmp_path, "loud", "--verbose", sets=[*FAST, "grow_steps=1"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Task run 'filter-" in out and "Finished in state Completed()" in out
    assert not (tmp_path / ".flywheel" / "logs" / "loud.log").exists()


def test_summary_markdown_has_the_table_champion_mlflow_and_lake():
    from tasks.report.summary import summary_key, summary_markdown

    doc = {
        "run": "Demo_1", "algorithm": "rest", "recipe": "arithmetic-rest", "lake": "s3://lake/x", "run_uri": "s3://lake/x/runs/Demo_1",
        "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment": "flywheel", "run_id": "abc",
                   "url": "http://127.0.0.1:5000/#/experiments/1/runs/abc"},
        "baseline": {"eval_reward": 0.1, "eval_accuracy": 0.1, "model_version": "1"},
        "iterations": [
            {"iteration": 1, "step": 1, "tau": 0.5, "samples": 10, "kept": 4, "eval_reward": 0.2, "eval_accuracy": 0.2,
             "model_version": "2", "promoted": True},
            {"iteration": 2, "step": 1, "tau": 0.6, "samples": 10, "kept": 0, "eval_reward": None, "eval_accuracy": None,
             "model_version": None, "promoted": False, "skipped": "filter kept no rows"},
        ],
        "champion": {"model_name": "arithmetic-rest", "version": "2", "eval_reward": 0.2}, "stopped": "completed all Grow steps",
    }
    md = summary_markdown(doc)
    assert summary_key("Demo_1") == "demo-1-summary"
    assert "| 1 | 1 | 0.500 | 10 | 4 | 0.200 | 0.200 | 2 (promoted) |" in md
    assert "| 2 | 1 | 0.600 | 10 | 0 | skipped: filter kept no rows | - | - |" in md
    assert "`models:/arithmetic-rest@champion` = version 2" in md
    assert "[abc](http://127.0.0.1:5000/#/experiments/1/runs/abc)" in md and "`s3://lake/x/runs/Demo_1/summary.json`" in md


def test_an_embedded_server_that_does_not_start_is_one_sentence_and_the_run_resumes(tmp_path):
    """A new Prefect home migrates its database on the first start (20-25 s on 2 idle cores): flywheel
    waits 180 s by default; when the server still does not answer, one sentence says what to change,
    and the run's name is free for the retry (that a released lease resumes is test_run_guard's)."""
    env = {**cli_env(tmp_path), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    argv = [FLYWHEEL, "run", str(RECIPE), "--run-name", "slow-start", "--set", "grow_steps=0", *sum((["--set", s] for s in FAST), [])]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "flywheel: the embedded Prefect server did not answer within 1 s; on a busy machine raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a running server (flywheel stack up)."
    ]
    lease = json.loads((tmp_path / "lake" / "runs" / "slow-start" / "lease.json").read_text())
    assert lease["released"] is True  # a retry under the same name is not refused as a second writer


def servers_of(prefect_home: Path) -> list[int]:
    """Pids of Prefect server processes (uvicorn) started with this Prefect home, waiting up to 5 s for
    one that is stopping: a run must leave none behind, whichever way it ends."""
    import os
    import time

    mark = f"PREFECT_HOME={prefect_home}".encode()
    for _ in range(50):
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and b"uvicorn" in (proc / "cmdline").read_bytes() and mark in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not pids:
            return []
        time.sleep(0.1)
    return pids


def test_the_embedded_server_stops_with_the_run(quiet, tmp_path):
    """The server starts in the background before the prompts are measured against the model; it
    stops with a run that completes, and with one whose prompts then prove too long for the model's
    context (exit 2, one sentence)."""
    work, proc = quiet
    assert proc.returncode == 0
    assert servers_of(work / "prefect") == []
    bad = run_cli(tmp_path, "bad-model", sets=[*FAST, "model.n_positions=8"])
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stderr.strip().splitlines() == [line for line in bad.stderr.strip().splitlines() if line.startswith("flywheel:")]
    assert "too long" in bad.stderr
    log = (tmp_path / ".flywheel" / "logs" / "bad-model.log")
    assert "Starting temporary server" in log.read_text()  # it had been started
    assert servers_of(tmp_path / "prefect") == []
