"""``alignment.lifeline``: a helper process (a training rank, the embedded Prefect server) ends when the run
that started it is gone, killed included, and also while the killed run waits, unreaped, for its own parent.
The run-level view (a stopped or killed distributed run leaves no ranks) is in tests/test_distributed_run.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alignment import lifeline

ROOT = Path(__file__).resolve().parents[1]
# A stand-in run: starts a server that would run for ever under a lifeline, says its pid, and waits.
RUN = """
import subprocess, sys, time
from alignment import lifeline
child = subprocess.Popen([sys.executable, "-m", "alignment.lifeline", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                         env=lifeline.launched_env(), stdout=subprocess.DEVNULL, stderr=open(sys.argv[1], "w"))
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_helper_stops_when_the_run_that_started_it_is_killed(tmp_path):
    err = tmp_path / "helper.stderr"
    run = subprocess.Popen([sys.executable, "-c", RUN, str(err)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        helper = int(run.stdout.readline())
        time.sleep(1.5)
        assert lifeline.running(helper)  # it follows a live run without stopping
        os.kill(run.pid, signal.SIGKILL)  # and not reaped: the run stays a zombie while we watch
        deadline = time.monotonic() + 10
        while lifeline.running(helper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not lifeline.running(helper)
        assert err.read_text() == ""  # the helper's output is the run's console: it stops without a word
    finally:
        run.kill()
        run.wait()


def test_a_program_that_follows_says_why_it_stopped_in_its_log(tmp_path):
    rank = "from alignment import lifeline; import time; lifeline.follow_launcher(0.1); time.sleep(60)"
    run = f"""
import subprocess, sys
from alignment import lifeline
subprocess.Popen([sys.executable, "-c", {rank!r}], env=lifeline.launched_env(), stderr=open({str(tmp_path / 'rank.log')!r}, "w"))
"""  # the run starts its rank and ends at once
    subprocess.run([sys.executable, "-c", run], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=60)
    log, deadline = tmp_path / "rank.log", time.monotonic() + 20
    while "has stopped" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.read_text().startswith("flywheel: the run that started this process (process ")


def test_a_process_is_itself_and_a_reused_number_is_not():
    me = lifeline.identity()
    assert me.startswith(f"{os.getpid()}:") and not lifeline.gone(me)
    assert lifeline.gone(f"{os.getpid()}:1")  # this number, another start time: another process
    with subprocess.Popen([sys.executable, "-c", "pass"]) as done:
        done.wait()
    assert lifeline.gone(lifeline.identity(done.pid))


def test_without_a_launcher_nothing_is_followed(monkeypatch):
    monkeypatch.delenv(lifeline.LAUNCHER_ENV, raising=False)
    lifeline.follow_launcher()  # returns at once, starts no watcher
    import threading

    assert "follow-launcher" not in [t.name for t in threading.enumerate()]


def test_descendants_are_found_to_any_depth():
    """How a stopping run finds what it started (the local Ray cluster's agents sit two levels down)."""
    grandchild = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    with subprocess.Popen([sys.executable, "-c", grandchild]) as child:
        try:
            deadline, below = time.monotonic() + 20, []
            while not below and time.monotonic() < deadline:
                below = lifeline.descendants(child.pid)
                time.sleep(0.1)
            assert len(below) == 1 and lifeline.running(below[0])
            assert child.pid in lifeline.descendants() and below[0] in lifeline.descendants()  # this process's too
        finally:
            for pid in [*lifeline.descendants(child.pid), child.pid]:
                os.kill(pid, signal.SIGKILL)
            child.wait()
    assert not lifeline.running(child.pid)


# A stand-in run with a local Ray cluster: it starts a reaper, then a helper (raylet) whose child (an agent)
# ignores SIGTERM and follows nothing; it says the reaper's, the helper's and the agent's pids, and waits.
RAY_LIKE = """
import subprocess, sys, time
from alignment import lifeline
reaper = lifeline.start_reaper()
agent = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
raylet = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {agent!r}]); print(p.pid, flush=True); time.sleep(600)"
helper = subprocess.Popen([sys.executable, "-c", raylet], stdout=subprocess.PIPE, text=True)
print(reaper.pid, helper.pid, helper.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


def test_a_reaper_kills_what_a_killed_run_left_behind():
    """A run killed outright: its helper dies with it (Ray's raylet does, by the kernel), and the helper's own child,
    left to init, is killed by the reaper within a second or two; the reaper then ends."""
    run = subprocess.Popen([sys.executable, "-c", RAY_LIKE], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids: list[int] = []
    try:
        pids = [int(p) for p in run.stdout.readline().split()]
        reaper, helper, agent = pids
        time.sleep(1.5)  # the reaper has seen them
        assert all(map(lifeline.running, pids))
        os.kill(run.pid, signal.SIGKILL)
        os.kill(helper, signal.SIGKILL)  # what the kernel does to Ray's own processes when the run goes
        run.wait()
        deadline = time.monotonic() + 10
        while (lifeline.running(agent) or lifeline.running(reaper)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not lifeline.running(agent) and not lifeline.running(reaper)
    finally:
        run.kill()
        run.wait()
        for pid in filter(lifeline.running, pids):  # a failed test leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
