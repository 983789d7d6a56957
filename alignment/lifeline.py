"""Child processes that end when the run that started them is gone.

A run starts long-lived helpers: the ranks of a distributed training stage (in a session of their own, so
a Ctrl-C in the terminal reaches the run, which stops in order, and not the ranks mid-collective) and the
embedded Prefect server. When the run stops — Ctrl-C, SIGTERM, a cancelled flow run, or SIGKILL, which
leaves it no time to clean up — nothing else would end them: ranks would go on training on devices nobody
uses, a server would hold its port and memory. Each helper therefore follows the process named in
``$FLYWHEEL_LAUNCHER`` (``pid:start time``, so a later process that reuses the number is not taken for it)
and exits within a second of it going.

``python -m alignment.lifeline -m MODULE ARGS...`` runs ``python -m MODULE ARGS...`` that way, silently; a
program of our own calls ``follow_launcher()`` first, which leaves one line in its log. ``descendants()``
lets a stopping run find what it started that follows nothing (a local Ray cluster's agents).

What follows nothing also outlives a run killed outright: a local Ray cluster's own processes die with the
run, but its dashboard and runtime-env agents, their children, are left to init. ``start_reaper()`` starts
a small process (``python -m alignment.lifeline --reap``) that notes what runs below the run every half
second and, once the run is gone, kills what of it still runs.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LAUNCHER_ENV = "FLYWHEEL_LAUNCHER"


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or none where there is no ``/proc``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def identity(pid: int | None = None) -> str:
    """``pid`` (this process by default) with its start time where ``/proc`` gives it: ``"pid:start"``."""
    pid = os.getpid() if pid is None else pid
    fields = _stat(pid)
    return f"{pid}:{fields[19] if len(fields) > 19 else ''}"


def launched_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (this process's by default) naming this process as the launcher its children follow."""
    return {**(os.environ if env is None else env), LAUNCHER_ENV: identity()}


def gone(launcher: str) -> bool:
    """Whether the process ``launcher`` names (``identity()``'s form) no longer runs."""
    pid = int(launcher.split(":", 1)[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user holds the number now: ours is gone
        return True
    # A dead process its parent has not reaped yet is a zombie and still answers kill(0); a parent that
    # waits for its child's output to end before reaping it would wait on us for ever.
    return _stat(pid)[:1] in (["Z"], ["X"]) or identity(pid) != launcher  # (no /proc: kill(0) alone decides)


def descendants(pid: int | None = None) -> list[int]:
    """The live processes below ``pid`` (this process by default), from ``/proc``; none where there is no ``/proc``."""
    root = os.getpid() if pid is None else pid
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] not in ("Z", "X"):
            parents[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = {root}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier and child not in found}
        found += sorted(frontier)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def follow_launcher(every: float = 1.0, *, say: bool = True) -> None:
    """When ``$FLYWHEEL_LAUNCHER`` names a process, exit this one (code 1) once it is gone, with one line on
    stderr (a rank's log) when ``say``."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return

    def watch() -> None:
        while not gone(launcher):
            time.sleep(every)
        if say:
            sys.stderr.write(f"flywheel: the run that started this process (process {launcher.split(':')[0]}) has "
                             "stopped; this process stops too.\n")
            sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="follow-launcher", daemon=True).start()


def reap(launcher: str, every: float = 0.5) -> list[int]:
    """Until the process ``launcher`` names is gone, note every process below it (this one aside); then kill
    those that still run, each checked by its start time so a process that reused a number is left alone.
    Returns the processes killed."""
    root, me = int(launcher.split(":", 1)[0]), os.getpid()
    seen: dict[int, str] = {}
    while not gone(launcher):
        seen.update((pid, identity(pid)) for pid in descendants(root) if pid != me)
        time.sleep(every)
    killed = []
    for pid, who in seen.items():
        if running(pid) and identity(pid) == who:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def start_reaper() -> subprocess.Popen:
    """A process that kills what this one started and left running once this one is gone, SIGKILL included
    (``reap``). It runs in a session of its own, so a Ctrl-C in the terminal leaves it to the run's orderly stop."""
    reaper = subprocess.Popen([sys.executable, "-m", "alignment.lifeline", "--reap"], env=launched_env(), start_new_session=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _REAPERS.append(reaper)  # held for the life of this process, which it outlives
    return reaper


_REAPERS: list[subprocess.Popen] = []


def main(argv: list[str]) -> None:
    if argv == ["--reap"] and os.environ.get(LAUNCHER_ENV):
        reap(os.environ[LAUNCHER_ENV])
        return
    if len(argv) < 2 or argv[0] != "-m":
        sys.exit("usage: python -m alignment.lifeline -m MODULE [ARGS...] | --reap")
    follow_launcher(say=False)  # its output is the run's console: the run has said how it ended
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
