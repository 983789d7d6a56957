"""What keeps a run whole: its identity, recorded at creation, and a lease held by its one writer.

Both live with the run's records, outside every table, so they work on ``file://`` and ``s3://`` and
across machines::

    {lake}/runs/{run}/run.json     <- the recipe the run was created with (minus what may change on resume)
    {lake}/runs/{run}/lease.json   <- who writes the run now, until when

**Identity.** A run records its recipe, less the keys a resume may change (``RESUMABLE``), and the
sha256 of the prompt, held-out and labelled files it names. Resuming with a different one is refused
with one sentence naming the changed keys, once anything of the run has been committed; before that
the record is simply replaced (a first attempt that failed on a typo must not pin the typo).

**Lease.** One writer per run: the lease is created atomically (``put_if_absent``) and renewed by a
daemon thread every ``TTL_S / 4`` seconds with a compare-and-swap (``put_if_unchanged``), so two
processes can never both believe they hold it. A holder killed with SIGKILL stops blocking when its
lease expires (``TTL_S``), or at once for a process on the same machine (its pid is gone). Expiry
compares the holder's clock with the reader's: machines whose clocks differ by more than a few
seconds shorten or lengthen that wait. A holder that could not renew in time (paused past expiry)
finds its lease taken and logs it; it never overwrites the new holder's lease.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from alignment.errors import UserError
from alignment.recipe import Recipe
from tasks.lake.cache import drop_manifests, hold_manifests
from tasks.lake.manifest import code_version, config_hash, sha256_file
from tasks.lake.paths import MANIFEST, check_name
from tasks.lake.store import Lake

RUN_FILE = "run.json"
LEASE_FILE = "lease.json"
TTL_S = 60.0

# Keys that may change when a run is resumed: how long it goes on, how it is scheduled, where its
# services are and on how many devices it trains; none changes what a committed stage holds.
RESUMABLE = (
    "grow_steps", "eval.patience", "orchestration", "mlflow.tracking_uri", "grow.batch_size",
    "eval.batch_size", "grow.shards", "lake", "s3", "reward_timeout_s", "distributed",
)
# Recipe values that are secrets are kept out of the lake: only whether they changed matters.
_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password")
_INPUT_FILES = ("task.prompts", "task.eval", "task.labelled")


class RunChanged(UserError):
    """A run was resumed with a recipe other than the one it was created with."""


class RunBusy(UserError):
    """Another process holds the run's lease."""


def _log() -> logging.Logger:
    return logging.getLogger("flywheel")


# -- names ---------------------------------------------------------------------------------------
def check_names(recipe: Recipe, run: str) -> None:
    """The run name and the registered model name follow ``tasks.lake.paths.NAME_RULE`` (one ``BadName`` sentence if not)."""
    check_name(run, "run name")
    check_name(recipe.model_name, "mlflow.model_name" if recipe.mlflow.model_name else "model name (the recipe name)")


# -- identity ------------------------------------------------------------------------------------
def identity(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the run's identity: volatile keys dropped, secrets replaced by their hash, input files hashed."""
    doc = _redacted(recipe.model_dump(mode="json"))
    for dotted in RESUMABLE:
        *parents, leaf = dotted.split(".")
        node = doc
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    doc["input_files"] = {key: _file_sha256(_get(recipe, key)) for key in _INPUT_FILES if _get(recipe, key)}
    return doc


def check_identity(lake: Lake, run: str, recipe: Recipe, *, record: bool = True) -> None:
    """Record the run's identity at creation; on resume, refuse a different one (``RunChanged``).

    With ``record=False`` it only refuses: nothing is written (``precheck_run``).
    """
    uri = f"{lake.run_uri(run)}/{RUN_FILE}"
    now = identity(recipe)
    try:
        recorded = lake.get_json(uri)
    except FileNotFoundError:
        recorded = None
    if recorded is not None and recorded.get("identity") == now:
        return
    if recorded is not None and _has_commits(lake, run):
        changed = _changed_keys(recorded.get("identity") or {}, now)
        raise RunChanged(
            f"Run {run!r} was created with a different recipe (changed: {', '.join(changed)}); resume it with the "
            f"settings it was created with, or start a new run with another --run-name (only "
            f"{', '.join(RESUMABLE)} may change on resume)."
        )
    if not record:
        return
    # A new run, a run from before identities were recorded, or one that committed nothing yet.
    lake.put_json(uri, {
        "run": run, "identity": now, "identity_sha256": config_hash(now), "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def _redacted(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: ("sha256:" + hashlib.sha256(str(v).encode()).hexdigest()[:16]
                if v is not None and any(w in str(k).lower() for w in _SECRET_WORDS) else _redacted(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_redacted(v) for v in node]
    return node


def _get(recipe: Recipe, dotted: str) -> Any:
    node: Any = recipe
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _file_sha256(path: str) -> str | None:
    """A prompt file's content hash (None when it is missing: loading it reports that)."""
    p = Path(path)
    return sha256_file(p) if p.is_file() else None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested document (a recipe's dump, a run's identity) as ``{"dotted.key": leaf}``, the keys
    ``--set`` takes. An empty mapping is a leaf of its own, so ``{}`` and a missing section differ."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    a, b = flatten(before), flatten(after)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    # input_files.task.prompts -> "task.prompts (file contents)"
    return [f"{k.removeprefix('input_files.')} (file contents)" if k.startswith("input_files.") else k for k in keys]


def _has_commits(lake: Lake, run: str) -> bool:
    models = f"{lake.uri}/models/{check_name(run, 'run name')}"
    return bool(lake.committed(run)) or any(u.endswith("/" + MANIFEST) for u in lake.store.list(models))


# -- lease ---------------------------------------------------------------------------------------
_HELD: dict[tuple[str, str], RunLease] = {}
_HELD_LOCK = threading.Lock()


def held(lake: Lake, run: str) -> RunLease | None:
    """This process's live lease on ``run``, if it holds one."""
    with _HELD_LOCK:
        lease = _HELD.get((lake.uri, run))
        return None if lease is None or lease.lost else lease


def acquire(lake: Lake, run: str) -> RunLease:
    """Take the lease on ``run`` for this process; ``RunBusy`` if another process holds it."""
    lease = RunLease(lake, run)
    lease.acquire()
    with _HELD_LOCK:
        _HELD[(lake.uri, run)] = lease
    hold_manifests(lake.uri, run)  # the one writer may keep the run's manifests (tasks.lake.cache)
    return lease


def release(lake_uri: str, run: str) -> None:
    """Release this process's lease on ``run`` in the lake (nothing if it holds none)."""
    with _HELD_LOCK:
        lease = _HELD.pop((lake_uri, run), None)
    drop_manifests(lake_uri, run)
    if lease is not None:
        lease.release()


class RunLease:
    """The lease document at ``{lake}/runs/{run}/lease.json`` while this process writes the run."""

    def __init__(self, lake: Lake, run: str, ttl_s: float = TTL_S):
        self.lake, self.run, self.ttl_s = lake, run, ttl_s
        self.uri = f"{lake.run_uri(run)}/{LEASE_FILE}"
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._written = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self, *, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({
            "run": self.run, "owner": self.owner, "host": socket.gethostname(), "boot_id": _boot_id(),
            "pid": os.getpid(), "pid_started": _pid_started(os.getpid()), "renewed_at": now,
            "expires_at": 0.0 if released else now + self.ttl_s, "released": released,
        }, indent=2).encode()

    def acquire(self) -> None:
        for _ in range(5):  # each miss means someone else changed the lease between our read and write
            doc = self._doc()
            try:
                current = self.lake.store.get(self.uri)
            except FileNotFoundError:
                if self.lake.store.put_if_absent(self.uri, doc):
                    return self._hold(doc)
                continue
            holder = _parse(current)
            if holder is not None and not _is_free(holder):
                raise RunBusy(_busy_message(self.lake, self.run, holder))
            if self.lake.store.put_if_unchanged(self.uri, doc, current):
                return self._hold(doc)
        raise RunBusy(f"Run {self.run!r} in {self.lake.uri} is being claimed by several processes at once; run one of them only.")

    def _hold(self, doc: bytes) -> None:
        self._written = doc
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if not self._swap(self._doc()):
                return

    def _swap(self, doc: bytes) -> bool:
        """Replace our lease document, unless someone else's is there now (then we have lost it)."""
        try:
            if self.lake.store.put_if_unchanged(self.uri, doc, self._written):
                self._written = doc
                return True
        except Exception as exc:  # a lake outage: keep trying until the lease would expire
            _log().warning("could not renew the lease on run %s: %s", self.run, exc)
            return True
        self.lost = True
        _log().error("run %s: another process took over this run's lease; this process's writes may now race it", self.run)
        return False

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.lost:
            try:
                self._swap(self._doc(released=True))
            except Exception as exc:  # it expires by itself
                _log().warning("could not release the lease on run %s: %s", self.run, exc)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _is_free(holder: dict[str, Any]) -> bool:
    """A released or expired lease, or one whose holder process on this machine is gone."""
    if holder.get("released") or float(holder.get("expires_at") or 0) <= time.time():
        return True
    if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id() and holder.get("boot_id"):
        pid = int(holder.get("pid") or 0)
        return pid <= 0 or _pid_started(pid) != holder.get("pid_started") or not _alive(pid)
    return False


def _busy_message(lake: Lake, run: str, holder: dict[str, Any]) -> str:
    until = time.strftime("%H:%M:%S UTC", time.gmtime(float(holder.get("expires_at") or 0)))
    return (
        f"Run {run!r} in {lake.uri} is being written by another process (pid {holder.get('pid')} on "
        f"{holder.get('host')}, lease renewed until {until}); wait for it to finish, or use another --run-name."
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), so a reused pid is not mistaken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def precheck_run(recipe: Recipe, run: str) -> None:
    """Read-only, before a server starts or a model loads: a run another process writes (``RunBusy``), or a
    resume with a changed recipe (``RunChanged``), is one sentence in seconds. ``guard_run`` checks both
    again under the lease, where a race is settled."""
    lake = Lake(recipe.lake, recipe.s3.model_dump(exclude_none=True))
    if held(lake, run) is None:
        try:
            holder = _parse(lake.store.get(f"{lake.run_uri(run)}/{LEASE_FILE}"))
        except FileNotFoundError:
            holder = None
        if holder is not None and not _is_free(holder):
            raise RunBusy(_busy_message(lake, run, holder))
    check_identity(lake, run, recipe, record=False)


def guard_run(recipe: Recipe, run: str) -> tuple[Lake, bool]:
    """Check the names, take the run's lease (unless this process holds it) and check the run's identity.

    Returns the lake and whether the lease was taken now (then the caller releases it with ``close_run``).
    Each failure is one ``UserError`` sentence: a bad name, a run another process writes, a changed recipe.
    """
    check_names(recipe, run)
    lake = Lake(recipe.lake, recipe.s3.model_dump(exclude_none=True))
    taken = held(lake, run) is None
    if taken:
        acquire(lake, run)
    try:
        check_identity(lake, run, recipe)
    except BaseException:
        if taken:
            release(lake.uri, run)
        raise
    return lake, taken
