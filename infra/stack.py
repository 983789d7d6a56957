"""The local stack: a Prefect server, an MLflow server and a SeaweedFS S3 server, all on 127.0.0.1.

    flywheel stack up        # start what is not running, wait until each answers its health check
    flywheel stack status    # pid, URL, health and log of each service
    flywheel stack down      # stop them (SIGTERM, then SIGKILL after a grace period)

Everything lives under ``.flywheel/stack/`` of the current directory (the repository root):

    state.json          ports, URLs and pids of the running services
    env                 ``export`` lines for clients (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_*), mode 0600
    credentials.json    the S3 keys, generated once and reused by every ``up``, mode 0600
    logs/               prefect.log, mlflow.log, weed.log: one place to look
    prefect/            PREFECT_HOME of the server: its SQLite database
    s3/                 SeaweedFS's data (buckets ``lake`` and ``mlflow``)

MLflow keeps its SQLite backend at ``mlflow/mlflow.db`` (the embedded default's database, so runs
made before the stack was up stay visible) and proxies artifacts to ``s3://mlflow/artifacts``.
Each service runs in its own session (``start_new_session``), outlives the command that started it,
and is stopped as a process group, so its workers stop with it. A pid file is only trusted when the
process's command line still names the service. Production settings: infra/README.md.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.seaweed import LOOPBACK, SeaweedError, port_is_free, start_seaweed

STACK_DIR = Path(".flywheel/stack")
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000, "s3": 8333}
BUCKETS = ("lake", "mlflow")
SERVICES = ("s3", "mlflow", "prefect")  # start order; stopped in reverse


class StackError(RuntimeError):
    """A service could not be started or stopped; the message names it and its log."""


class StackInputError(StackError):
    """The command cannot work with what it was given (ports, the stack's own files); nothing was started."""


@dataclass(frozen=True)
class Stack:
    """Paths of one stack, rooted at a project directory."""

    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> Stack:
        return cls(Path(root).resolve())

    @property
    def dir(self) -> Path:
        return self.root / STACK_DIR

    def log(self, service: str) -> Path:
        return self.dir / "logs" / ("weed.log" if service == "s3" else f"{service}.log")

    def read_state(self) -> dict[str, Any]:
        path = self.dir / "state.json"
        try:
            state = json.loads(path.read_text()) if path.exists() else {}
        except (ValueError, OSError) as exc:
            raise StackInputError(
                f"{path} cannot be read ({type(exc).__name__}: {exc}); stop any stack servers still running "
                "and delete the file."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, dict) and isinstance(v.get("pid"), int) for v in state.values()):
            raise StackInputError(f"{path} is not a stack's state (service -> pid and port); stop leftover servers and delete it.")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        (self.dir / "state.json").write_text(json.dumps(state, indent=2))

    def credentials(self) -> dict[str, str]:
        """The S3 keys of this stack, created on first use and kept (mode 0600)."""
        path = self.dir / "credentials.json"
        if not path.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            keys = {"access_key": f"flywheel-{secrets.token_hex(4)}", "secret_key": secrets.token_urlsafe(30)}
            _write_private(path, json.dumps(keys))
        return json.loads(path.read_text())


# -- health ---------------------------------------------------------------------------------------
def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers below HTTP 500 (S3 answers 403 to an unsigned request: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def health_url(service: str, port: int) -> str:
    return {
        "prefect": f"http://{LOOPBACK}:{port}/api/health",
        "mlflow": f"http://{LOOPBACK}:{port}/health",
        "s3": f"http://{LOOPBACK}:{port}/",
    }[service]


def listening(port: int) -> bool:
    """Whether something accepts connections on ``port`` on loopback."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


# -- processes ------------------------------------------------------------------------------------
_MARKERS = {"prefect": "prefect", "mlflow": "mlflow", "s3": "weed"}


def pid_alive(pid: int, service: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, given ``service``, is still that service's process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return service is None or _MARKERS[service] in cmdline


def _spawn(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _bin(name: str) -> str:
    """An executable of this environment (``.venv/bin/NAME``), so the stack uses the pinned versions."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# Telemetry of Prefect and MLflow stays off in the stack's servers and in every client of the env file.
NO_TELEMETRY = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env.update(NO_TELEMETRY, **extra)
    return env


def start_prefect(home: Path, port: int, log: Path, *, ui: bool = True) -> int:
    """``prefect server start`` on loopback with its SQLite database in ``home``; returns the pid."""
    home.mkdir(parents=True, exist_ok=True)
    # The UI's own API address: without it the browser calls the default port 4200, not this server's.
    env = _child_env(PREFECT_HOME=str(home), PREFECT_SERVER_UI_ENABLED="true" if ui else "false",
                     PREFECT_UI_API_URL=f"http://{LOOPBACK}:{port}/api")
    command = [_bin("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port), "--analytics-off"]
    return _spawn(command, log, env, home)


def start_mlflow(root: Path, port: int, log: Path, s3_endpoint: str, keys: dict[str, str]) -> int:
    """``mlflow server`` on loopback: SQLite under ``root/mlflow``, artifacts proxied to ``s3://mlflow``."""
    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    env = _child_env(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID=keys["access_key"],
                     AWS_SECRET_ACCESS_KEY=keys["secret_key"], AWS_DEFAULT_REGION="us-east-1")
    command = [
        _bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        "--artifacts-destination", "s3://mlflow/artifacts",
    ]
    return _spawn(command, log, env, root)


def wait_healthy(service: str, pid: int, port: int, log: Path, timeout: float) -> None:
    """Poll the health URL until it answers, the process exits, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise StackError(f"{service} exited while starting; see {log}:\n{_tail(log)}")
        if http_ok(health_url(service, port)):
            return
        time.sleep(0.5)
    raise StackError(f"{service} did not answer on port {port} within {timeout:.0f} s; see {log}:\n{_tail(log)}")


def stop_pid(pid: int, service: str, timeout: float = 20.0) -> None:
    """SIGTERM the service's process group, SIGKILL it after ``timeout`` seconds."""
    if not pid_alive(pid, service):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)  # the service leads its own session: its workers share the group
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.2)
    raise StackError(f"{service} (pid {pid}) did not stop, even after SIGKILL.")


# -- the commands ---------------------------------------------------------------------------------
def up(root: str | Path = ".", ports: dict[str, int] | None = None, *, ui: bool = True, timeout: float = 180.0) -> dict[str, Any]:
    """Start the services that are not running; return ``status()``. A failure stops what this call started."""
    stack = Stack.at(root)
    ports = {**DEFAULT_PORTS, **(ports or {})}
    shared = sorted({p for p in ports.values() if list(ports.values()).count(p) > 1})
    if shared:
        names = [n for n in SERVICES if ports[n] in shared]
        raise StackInputError(f"Port {shared[0]} is given to {' and '.join(names)}: each service needs its own port.")
    state = {k: v for k, v in stack.read_state().items() if pid_alive(v.get("pid", -1), k)}
    for name in SERVICES:
        if name not in state and not port_is_free(ports[name]):
            raise StackInputError(f"Port {ports[name]} for {name} is taken by another process: stop it or pass --{name}-port.")
    keys = stack.credentials()
    started: list[str] = []
    try:
        if "s3" not in state:
            server = start_seaweed(stack.dir / "s3", access_key=keys["access_key"], secret_key=keys["secret_key"],
                                   s3_port=ports["s3"], startup_timeout=timeout)
            for bucket in BUCKETS:
                server.create_bucket(bucket)
            _link(stack.log("s3"), server.log_path)
            state["s3"] = {"pid": server.process.pid, "port": ports["s3"], "url": server.endpoint_url,
                           "ports": list(vars(server.ports).values())}
            started.append("s3")
        launch = {
            "mlflow": lambda: start_mlflow(stack.root, ports["mlflow"], stack.log("mlflow"), state["s3"]["url"], keys),
            "prefect": lambda: start_prefect(stack.dir / "prefect", ports["prefect"], stack.log("prefect"), ui=ui),
        }
        for name in ("mlflow", "prefect"):  # both start at once; their health is awaited together
            if name not in state:
                url = f"http://{LOOPBACK}:{ports[name]}" + ("/api" if name == "prefect" else "")
                state[name] = {"pid": launch[name](), "port": ports[name], "url": url}
                started.append(name)
        for name in started:
            if name != "s3":
                wait_healthy(name, state[name]["pid"], state[name]["port"], stack.log(name), timeout)
    except BaseException as exc:
        for name in reversed(started):
            stop_pid(state.pop(name)["pid"], name, timeout=10)
        if isinstance(exc, SeaweedError):
            raise StackError(str(exc)) from exc
        raise
    finally:
        stack.write_state(state)
    _write_private(stack.dir / "env", "".join(f"export {k}={v}\n" for k, v in client_env(stack.root).items()))
    return status(root)


def down(root: str | Path = ".", port_timeout: float = 15.0) -> dict[str, Any]:
    """Stop every running service (reverse start order); return what was stopped and what still listens.

    A stopped server's ports can take a moment to close (its workers exit after it), so each port is
    given up to ``port_timeout`` seconds before it counts as still listening.
    """
    stack = Stack.at(root)
    state = stack.read_state()
    stopped = []
    for name in reversed(SERVICES):
        info = state.get(name)
        if info and pid_alive(info["pid"], name):
            stop_pid(info["pid"], name)
            stopped.append(name)
    ports = sorted({p for info in state.values() for p in [info.get("port"), *info.get("ports", [])] if p})
    stack.write_state({})
    deadline = time.monotonic() + port_timeout
    while (still := [p for p in ports if listening(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {"stopped": stopped, "still_listening": still}


def status(root: str | Path = ".") -> dict[str, Any]:
    """Each service: running (pid alive), healthy (health URL answers), URL, pid and log."""
    stack = Stack.at(root)
    state = stack.read_state()
    out: dict[str, Any] = {}
    for name in SERVICES:
        info = state.get(name, {})
        running = bool(info) and pid_alive(info["pid"], name)
        out[name] = {
            "running": running,
            "healthy": running and http_ok(health_url(name, info["port"])),
            "url": info.get("url"),
            "pid": info.get("pid") if running else None,
            "log": str(stack.log(name)),
        }
    return out


def client_env(root: str | Path = ".") -> dict[str, str]:
    """The variables that point clients at a running stack (empty if it is not up). Holds the S3 secret."""
    stack = Stack.at(root)
    state = stack.read_state()
    if not all(name in state and pid_alive(state[name]["pid"], name) for name in SERVICES):
        return {}
    keys = stack.credentials()
    return {
        "PREFECT_API_URL": state["prefect"]["url"],
        "MLFLOW_TRACKING_URI": state["mlflow"]["url"],
        "AWS_ENDPOINT_URL": state["s3"]["url"],
        "AWS_ACCESS_KEY_ID": keys["access_key"],
        "AWS_SECRET_ACCESS_KEY": keys["secret_key"],
        "AWS_REGION": "us-east-1",
        **NO_TELEMETRY,
    }


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
