"""The embedded Prefect server of ``flywheel run``: started early, in the background, when no
``PREFECT_API_URL`` is set.

Left to itself, Prefect starts its embedded server on the first API call of the flow: it imports its
server module into this process (about 9 s on 2 cores) and only then spawns the server, which
migrates a new database (20-25 s the first time): all of it before the first task runs. flywheel
spawns the same server (Prefect's own ASGI app, with the settings Prefect would give it) as soon as
the run's inputs are checked, loads the flows while it starts, and points this process's Prefect
settings at it for the run. One server serves every run of the process and stops when it exits, even
when it is killed (``alignment.lifeline``).

Once it answers, the server runs at a lower CPU priority (``nice`` +10): it records the run's task
states, events and logs, which the flow sends without waiting, about 30 ms of CPU per task run; on a
machine whose cores sampling and training keep busy, that bookkeeping then waits for an idle core
instead of taking one from the work (bench/bench_orchestration.py).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from alignment import lifeline

PORT_IN_USE = 3  # uvicorn's exit code when its port was taken between choosing and binding it
BOOKKEEPING_NICENESS = 10  # added to the server's nice value once it answers


class EmbeddedServerError(RuntimeError):
    """The embedded server did not answer in time (a service failure, not the user's input)."""


def not_answering(waited: str) -> str:
    """The sentence for an embedded server that did not answer within ``waited`` seconds."""
    return (f"the embedded Prefect server did not answer within {waited} s; on a busy machine raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a running server (flywheel stack up).")


class EmbeddedServer:
    """A Prefect server process on a free loopback port (ephemeral mode: no UI, no scheduler)."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.ready = False  # answered once: later runs of the process do not wait again

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = lifeline.launched_env({
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        })
        _log().info("Starting temporary server on http://127.0.0.1:%d", self.port)
        self.process = subprocess.Popen(  # uvicorn under a lifeline: a killed run leaves no server behind
            [sys.executable, "-m", "alignment.lifeline", "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL,
        )

    def wait(self, timeout_s: float) -> None:
        """Until the server answers ``/health``; ``EmbeddedServerError`` after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code == PORT_IN_USE:
                self.spawn()
                continue
            if code is not None:
                raise EmbeddedServerError(f"the embedded Prefect server exited with code {code} before answering.")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        self._yield_cpu()
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise EmbeddedServerError(not_answering(f"{timeout_s:g}"))

    def _yield_cpu(self) -> None:
        """Lower the server's CPU priority (after its start-up, which the run waits for at full priority)."""
        assert self.process is not None
        pid = self.process.pid
        try:  # Linux keeps a nice value per thread: every thread of the server, and those it starts later inherit it
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            threads = [pid]
        for thread in threads:
            with contextlib.suppress(AttributeError, OSError):  # no setpriority (Windows), a thread gone, or not allowed
                os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BOOKKEEPING_NICENESS))

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            _log().info("Stopping temporary server on http://127.0.0.1:%d", self.port)
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """At once, saying nothing (Ctrl-C)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def _log():
    from prefect.logging import get_logger

    return get_logger()  # Prefect's logger for these lines, so they go where its own lines go


_SERVER: EmbeddedServer | None = None


def start() -> EmbeddedServer | None:
    """Spawn the process's embedded server unless Prefect has an API (``PREFECT_API_URL``) or one runs
    already; returns it (``None`` when a configured server is used). Does not wait for it."""
    global _SERVER
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None  # a configured server, or none allowed (Prefect says so itself)
    if _SERVER is None or _SERVER.process is None or _SERVER.process.poll() is not None:
        _SERVER = EmbeddedServer()
        _SERVER.spawn()
        atexit.register(_SERVER.stop)
    return _SERVER


@contextlib.contextmanager
def use(server: EmbeddedServer | None) -> Iterator[None]:
    """Wait for ``server`` (once) and point Prefect at it while the block runs."""
    if server is None:
        yield
        return
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        temporary_settings,
    )

    if not server.ready:
        server.wait(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        server.ready = True
    # No UI link in the log: the embedded server has no UI, and it stops with the process.
    with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_UI_URL: ""}):
        yield


def kill() -> None:
    """Kill the embedded server now (a stopping process), saying nothing."""
    if _SERVER is not None:
        _SERVER.kill()


def stop() -> None:
    """Stop the embedded server now, if this process started one (it would stop at exit anyway)."""
    if _SERVER is not None:
        _SERVER.stop()
