"""pytest fixtures for a real Prefect server: ``prefect server start`` on a free loopback port.

Registered as a plugin in ``tests/conftest.py``. One server (SQLite, no UI, its own PREFECT_HOME)
serves the whole session: the tests that need deployments, work pools, workers or global
concurrency limits share it and name what they create uniquely.

- ``prefect_server`` (session): the server's API URL.
- ``api`` (function): ``PREFECT_API_URL`` pointing at it for the test's duration.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM a server or worker this test started; SIGKILL it if it has not exited within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (SQLite, no UI) on a free loopback port; its API URL."""
    from infra.stack import start_prefect, stop_pid, wait_healthy

    home = tmp_path_factory.mktemp("prefect-server")
    port, log = free_port(), home / "server.log"
    pid = start_prefect(home, port, log, ui=False)
    try:
        wait_healthy("prefect", pid, port, log, timeout=180)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_pid(pid, "prefect", timeout=15)


@pytest.fixture
def api(prefect_server: str) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server
