"""The embedded Prefect server's bookkeeping yields the CPU to the run's work (flows/server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.server import BOOKKEEPING_NICENESS, EmbeddedServer

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are read from /proc")


def nice_values(pid: int) -> dict[int, int]:
    """Each thread's nice value (field 19 of /proc/PID/task/TID/stat)."""
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        values[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[16])
    return values


def test_every_thread_of_the_server_and_those_it_starts_later_run_at_lower_priority():
    """Linux keeps a nice value per thread: all of the server's threads are lowered, not only its first,
    and a thread it starts afterwards (a database connection's) inherits the lower priority."""
    script = (
        "import sys, threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "print('up', flush=True); sys.stdin.readline()\n"  # lowered here, then one more thread
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "print('more', flush=True); time.sleep(30)\n"
    )
    server = EmbeddedServer()
    server.process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.process.stdout.readline() == "up\n"
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        before = nice_values(server.process.pid)
        assert len(before) == 2 and set(before.values()) == {ours}
        server._yield_cpu()
        server.process.stdin.write("\n")
        server.process.stdin.flush()
        assert server.process.stdout.readline() == "more\n"
        deadline = time.monotonic() + 10
        while len(after := nice_values(server.process.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(after) == 3
        assert set(after.values()) == {min(19, ours + BOOKKEEPING_NICENESS)}
    finally:
        server.kill()
        server.process.wait(timeout=10)
