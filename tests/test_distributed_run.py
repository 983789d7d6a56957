"""``flywheel run`` with its training on two processes (FSDP2, gloo on CPU), as a user runs it.

The run is a subprocess; a watcher reads ``/proc`` while it goes and records the training ranks it
sees (the ``-m tasks.launch`` children of torchrun's agent). Slow tier: a small run on two processes,
the demo recipe at full size beside a one-process run of it (the lake and MLflow must hold the same
things), and a rank killed mid-step, then the run resumed. Default tier: distributed settings that
cannot work, refused before anything runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.lake import Lake
from tests.flywheel_helpers import FAST, RECIPE, ROOT, manifest_path, read_stage, run_dir, versions_of

FSDP = ["distributed.strategy=fsdp", "distributed.processes=2"]


def rank_pids(under: int | None = None) -> list[int]:
    """The training ranks alive now: the ``python -m tasks.launch`` children of torchrun's agent (of an agent
    that descends from process ``under``, when given: other test runs on the machine launch ranks too)."""
    procs: dict[int, tuple[int, list[bytes]]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        procs[int(proc.name)] = (ppid, args)
    def descends(pid: int) -> bool:
        for _ in range(64):
            if pid == under:
                return True
            if pid not in procs:
                return False
            pid = procs[pid][0]
        return False

    agents = {pid for pid, (_, args) in procs.items() if b"torch.distributed.run" in args and (under is None or descends(pid))}
    return [pid for pid, (ppid, args) in procs.items() if ppid in agents and b"tasks.launch" in args]


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


class Watch(threading.Thread):
    """The most training ranks seen alive at once while the run goes."""

    def __init__(self, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.proc, self.most, self.seen, self.stopped = proc, 0, set(), False

    def run(self) -> None:
        while not self.stopped:
            pids = rank_pids(self.proc.pid)
            self.most = max(self.most, len(pids))
            self.seen.update(pids)
            time.sleep(0.2)


def start(cwd: Path, run: str, *sets: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", run, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out, err


def summary(cwd: Path, run: str) -> dict:
    return json.loads((run_dir(cwd / "lake", run) / "summary.json").read_text())


def committed(cwd: Path, run: str) -> list[tuple]:
    return sorted((a.stage, a.iteration, a.step) for a in Lake(str(cwd / "lake")).committed(run))


@pytest.mark.slow  # 90 s on 2 cores; the default tier keeps the world-size comparison and the killed rank
def test_a_run_trains_on_two_processes(workdir):
    proc = start(workdir, "fsdp", *FAST, *FSDP)
    watch = Watch(proc)
    watch.start()
    code, out, err = finish(proc)
    watch.stopped = True
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    assert watch.most == 2, f"saw {watch.most} training ranks at once"
    assert not [pid for pid in watch.seen if alive(pid)]  # none left behind
    doc = summary(workdir, "fsdp")
    trained = [r for r in doc["iterations"] if r.get("model_version")]
    assert trained and all(r["world_size"] == 2 and r["strategy"] == "fsdp" for r in trained)
    assert all(len(r["train_peak_memory_mib"]) == 2 for r in trained)
    from tests.flywheel_helpers import client_for

    client = client_for(workdir)
    version = versions_of(workdir)[-1]
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["world_size"] == 2 and metrics["peak_memory_mib_rank1"] > 0
    experiment = client.get_run(version.run_id).info.experiment_id
    parents = client.search_runs([experiment], filter_string="params.`distributed.strategy` = 'fsdp'")
    assert parents and parents[0].data.params["distributed.processes"] == "2"  # the recipe's section, as params


@pytest.mark.slow  # 100 s on 2 cores
def test_grpo_trains_and_scores_its_groups_on_two_processes(tmp_path):
    """GRPO's two launched stages: the no-grad π_old/π_ref pass (each rank scores its block of samples) and the
    μ epochs of updates; both run as 2 ranks, and the step's record says so."""
    cmd = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "recipes" / "arithmetic-grpo.yaml"), "--run-name", "grpo",
           *[a for s in [*FSDP, "grpo.steps_per_iteration=2", "grow_steps=1", "warm_start.epochs=10"] for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    watch = Watch(proc)
    watch.start()
    code, out, err = finish(proc)
    watch.stopped = True
    assert code == 0, err[-3000:]
    assert watch.most == 2 and not [pid for pid in watch.seen if alive(pid)]
    lines = out.splitlines()
    launched = [ln.split(" ran as")[0] for ln in lines if " ran as 2 ranks (fsdp, torchrun)" in ln]
    assert launched == ["warm-start · train"] + ["groups · pair", "train"] * 2, lines  # the warm start, then each step's two
    [record] = [r for r in summary(tmp_path, "grpo")["iterations"] if r.get("model_version")]
    assert record["world_size"] == 2 and len(record["train_peak_memory_mib"]) == 2
    groups = read_stage(tmp_path / "lake", "grpo", "iteration=1/groups/step=2")
    assert groups.height and groups["old_logps"].list.len().min() > 0  # every kept sample has π_old's log-probs


@pytest.mark.slow
def test_the_demo_on_two_processes_writes_what_one_process_writes_and_still_learns(tmp_path):
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    one = start(one_dir, "demo")
    code, _, err = finish(one)
    assert code == 0, err[-3000:]
    proc = start(two_dir, "demo", *FSDP)
    watch = Watch(proc)
    watch.start()
    code, _, err = finish(proc)
    watch.stopped = True
    assert code == 0, err[-3000:]
    assert watch.most == 2
    assert committed(two_dir, "demo") == committed(one_dir, "demo")
    steps = lambda d: sorted((v.tags["flywheel.iteration"], v.tags["flywheel.step"]) for v in versions_of(d))  # noqa: E731
    assert steps(two_dir) == steps(one_dir)  # one model version per step, as one process registers
    doc = summary(two_dir, "demo")
    best = max(r["eval_accuracy"] for r in doc["iterations"] if r.get("eval_accuracy") is not None)
    assert best - doc["baseline"]["eval_accuracy"] >= 0.30, (doc["baseline"], best)


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_in_one_sentence_and_the_run_resumes(workdir):
    proc = start(workdir, "killed", *FAST, *FSDP, "distributed.timeout_s=60")
    # Kill rank 1 once the first Improve step trains (its filtered data is committed and ranks are up).
    filtered = run_dir(workdir / "lake", "killed") / "stages" / "filtered"
    deadline, victim = time.monotonic() + 600, None
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        pids = rank_pids(proc.pid)
        if filtered.exists() and len(pids) == 2:
            time.sleep(1.5)  # into training: model loaded, steps running
            victim, ranks = max(pids), pids
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.1)
    assert victim is not None, "never saw the Improve step's ranks"
    killed_at = time.monotonic()
    code, out, err = finish(proc)
    assert time.monotonic() - killed_at < 60
    assert code == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("flywheel:")]
    assert len(lines) == 1 and "was killed by SIGKILL" in lines[0] and "committed nothing" in lines[0], err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out
    assert not [pid for pid in ranks if alive(pid)]  # the other rank was stopped too, not orphaned
    improved = manifest_path(workdir / "lake", "killed", "iteration=1/checkpoint/step=1")
    assert not improved.exists()  # the killed stage committed nothing
    code, _, err = finish(start(workdir, "killed", *FAST, *FSDP, "distributed.timeout_s=60"))
    assert code == 0, err[-3000:]
    assert improved.exists()
    assert summary(workdir, "killed")["stopped"].startswith("completed")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_stopping_the_run_stops_its_ranks(workdir, signum):
    """The ranks run in a session of their own, so a Ctrl-C in the terminal does not reach them; they follow the
    run instead, and neither a stopped nor a killed run leaves training processes behind. A stopped run resumes."""
    proc = start(workdir, "stopped", *FAST, *FSDP)
    deadline, ranks = time.monotonic() + 600, []
    while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
        ranks = rank_pids(proc.pid)
        time.sleep(0.1)
    assert len(ranks) == 2, "never saw the warm start's ranks"
    time.sleep(1.5)  # into training
    os.kill(proc.pid, signum)
    code, _, err = finish(proc, timeout=60)
    assert code == (130 if signum == signal.SIGINT else -signal.SIGKILL), err[-3000:]
    deadline = time.monotonic() + 20
    while [pid for pid in ranks if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in ranks if alive(pid)]
    assert not manifest_path(workdir / "lake", "stopped", "iteration=0/checkpoint/step=0").exists()  # the warm start committed nothing
    if signum == signal.SIGINT:
        code, _, err = finish(start(workdir, "stopped", *FAST, *FSDP))
        assert code == 0, err[-3000:]
        assert summary(workdir, "stopped")["stopped"].startswith("completed")


@pytest.mark.parametrize("sets, says", [
    (["distributed.strategy=fsdp", "distributed.processes=64"], "64 ranks but warm_start.batch_size is 16"),
    (["distributed.strategy=ddp", "distributed.processes=2", "distributed.launcher=ray"], "has no Ray cluster"),
    (["distributed.strategy=ddp", "distributed.nodes=2"], "set distributed.launcher: ray to train across nodes"),
    (["distributed.strategy=ddp", "distributed.processes=2", "distributed.launcher=ray", "orchestration.ray_address=127.0.0.1:9"],
     "no Ray cluster answers at 127.0.0.1:9"),
    (["distributed.strategy=zero3"], "distributed.strategy"),
    (["distributed.processes=0"], "distributed.processes"),
])
def test_a_distributed_setting_that_cannot_work_is_one_sentence_before_anything_runs(workdir, sets, says):
    code, out, err = finish(start(workdir, "refused", *sets), timeout=120)
    assert code == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("flywheel:") and says in lines[0], err
    assert not (workdir / "lake").exists() or not any((workdir / "lake").rglob("*.parquet"))


def test_fsdp_refuses_a_model_that_names_no_decoder_layers():
    import torch

    from alignment.distributed import LayersNotFound, decoder_layers

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

    with pytest.raises(LayersNotFound, match="use distributed.strategy: ddp"):
        decoder_layers(Plain())
