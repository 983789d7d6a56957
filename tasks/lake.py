"""The lake: every stage of every iteration as hive-partitioned Parquet, committed by a manifest.

Layout (identical under ``file://`` and ``s3://``)::

    {lake}/{run}/iteration={g}/{stage}/part-{shard:05d}.parquet
    {lake}/{run}/iteration={g}/{stage}/_manifest.json      <- written last: the commit marker
    {lake}/{run}/summary.json

Commit protocol (STYLE #7): clear whatever an unfinished attempt left, write the parts, read them
back to verify the row counts, then write the manifest. A stage is done only when its manifest
exists; readers read exactly the files the manifest lists, so a stage killed mid-write is never
half-visible, and a re-run replaces it. Partition keys live only in the path, never as columns.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from alignment.errors import UserError
from tasks.storage import Store, normalize_uri, open_store

MANIFEST = "_manifest.json"
PARTITION_KEYS = ("iteration", "step")


def code_version() -> str:
    try:
        return version("flywheel")
    except PackageNotFoundError:
        return "unknown"


def config_hash(config: Any) -> str:
    """A stable hash of a JSON-able config: equal configs give equal hashes across processes."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageNotFound(FileNotFoundError):
    """A stage was read before it was committed."""


class BadName(UserError):
    """A run or model name that could escape the lake, forge a partition or overflow a path."""


class StageChanged(UserError):
    """A committed stage was made with a config other than the one a run would use now."""


class CorruptPart(UserError):
    """A part of a committed stage no longer matches what its manifest recorded."""


# Run names become a folder of the lake and model names a registry key: a single path segment of a
# few safe characters, so nothing typed escapes the lake (``..``, ``/``) or forges a hive partition (``=``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit and without '..'"


def check_name(name: str, what: str) -> str:
    """``name`` if it follows ``NAME_RULE``; else a ``BadName`` sentence saying which rule it breaks."""
    shown = name if len(name) <= 40 else f"{name[:40]}..."
    if not name:
        problem = "is empty"
    elif len(name) > 128:
        problem = f"is {len(name)} characters long"
    elif ".." in name:
        problem = "contains '..'"
    elif NAME_PATTERN.fullmatch(name):
        return name
    else:
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        problem = f"contains {', '.join(repr(c) for c in bad)}" if bad else "does not start with a letter or digit"
    raise BadName(f"The {what} {shown!r} {problem}: use {NAME_RULE}.")


@dataclass(frozen=True)
class Manifest:
    uri: str
    rows: int
    files: list[dict[str, Any]]
    schema: dict[str, str]
    config_hash: str
    parents: list[str]
    sha256: str  # of the manifest itself: the dataset's identity for lineage


class Lake:
    """Read and write stages under one lake root."""

    def __init__(self, uri: str, s3: dict[str, Any] | None = None):
        self.uri = normalize_uri(uri)
        self.store: Store = open_store(self.uri, s3)

    # -- addresses ---------------------------------------------------------------------------
    def run_uri(self, run: str) -> str:
        return f"{self.uri}/{check_name(run, 'run name')}"

    def stage_uri(self, run: str, iteration: int, stage: str, step: int | None = None) -> str:
        uri = f"{self.run_uri(run)}/iteration={iteration}/{stage}"
        return uri if step is None else f"{uri}/step={step}"

    # -- commit protocol ---------------------------------------------------------------------
    def is_done(self, stage_uri: str) -> bool:
        return self.store.exists(f"{stage_uri}/{MANIFEST}")

    def manifest(self, stage_uri: str) -> Manifest:
        try:
            raw = self.store.get(f"{stage_uri}/{MANIFEST}")
        except (FileNotFoundError, KeyError) as exc:
            raise StageNotFound(f"No committed stage at {stage_uri} (it has no {MANIFEST}).") from exc
        data = json.loads(raw)
        return Manifest(
            uri=stage_uri,
            rows=data["rows"],
            files=data["files"],
            schema=data["schema"],
            config_hash=data["config_hash"],
            parents=data["parents"],
            sha256=hashlib.sha256(raw).hexdigest(),
        )

    def check_config(self, stage_uri: str, config: Any) -> Manifest:
        """The committed stage's manifest, if it was made with ``config``; ``StageChanged`` if not."""
        m = self.manifest(stage_uri)
        if m.config_hash != config_hash(config):
            raise StageChanged(
                f"The committed stage {stage_uri} was made with other settings than this run's (config hash "
                f"{m.config_hash}, now {config_hash(config)}); delete {stage_uri}/{MANIFEST} to re-run it, or use another --run-name."
            )
        return m

    def write_stage(
        self,
        stage_uri: str,
        shards: list[pl.DataFrame],
        *,
        config: Any = None,
        parents: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Commit ``shards`` as the stage at ``stage_uri``; a stage already committed is left as it is
        (whether it was made with this ``config`` is for the caller to ask: ``check_config``)."""
        if self.is_done(stage_uri):
            return self.manifest(stage_uri)
        self.store.delete_prefix(stage_uri)
        files = []
        for shard, frame in enumerate(shards):
            files.append(self.write_part(stage_uri, shard, frame))
        return self.commit(stage_uri, files, config=config, parents=parents, extra=extra)

    def write_part(self, stage_uri: str, shard: int, frame: pl.DataFrame) -> dict[str, Any]:
        clash = [k for k in PARTITION_KEYS if k in frame.columns]
        if clash:
            raise ValueError(f"Columns {clash} are partition keys of the lake path and must not be written as columns.")
        buf = io.BytesIO()
        frame.write_parquet(buf, compression="zstd", statistics=True)
        data = buf.getvalue()
        name = f"part-{shard:05d}.parquet"
        self.store.put(f"{stage_uri}/{name}", data)
        return {"name": name, "rows": frame.height, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def commit(
        self,
        stage_uri: str,
        files: list[dict[str, Any]],
        *,
        config: Any = None,
        parents: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Verify the parts and write the manifest last: the stage becomes visible atomically."""
        schema: dict[str, str] = {}
        for f in files:
            meta = pq.read_metadata(io.BytesIO(self.store.get(f"{stage_uri}/{f['name']}")))
            if meta.num_rows != f["rows"]:
                raise OSError(f"Part {stage_uri}/{f['name']} holds {meta.num_rows} rows, expected {f['rows']}.")
            schema = schema or {n: str(t) for n, t in zip(meta.schema.names, meta.schema.to_arrow_schema().types)}
        manifest = {
            "stage": stage_uri.rsplit("/iteration=", 1)[-1].split("/", 1)[-1],
            "uri": stage_uri,
            "rows": sum(f["rows"] for f in files),
            "files": files,
            "schema": schema,
            "config_hash": config_hash(config),
            "config": config,
            "parents": parents or [],
            "code_version": code_version(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        self.store.put(f"{stage_uri}/{MANIFEST}", json.dumps(manifest, indent=2, default=str).encode())
        return self.manifest(stage_uri)

    def read(self, stage_uri: str) -> pl.DataFrame:
        """The rows of a committed stage, read from exactly the files its manifest lists, each verified."""
        m = self.manifest(stage_uri)
        frames = [self._read_part(m, f) for f in m.files]
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]

    def read_part(self, stage_uri: str, name: str) -> pl.DataFrame:
        """One part of a committed stage, verified against the manifest."""
        m = self.manifest(stage_uri)
        entry = next((f for f in m.files if f["name"] == name), None)
        if entry is None:
            raise StageNotFound(f"The stage {stage_uri} has no part {name} in its {MANIFEST}.")
        return self._read_part(m, entry)

    def _read_part(self, m: Manifest, entry: dict[str, Any]) -> pl.DataFrame:
        """A part's rows, after checking its size, sha256 and row count against the manifest (``CorruptPart``).

        Hashing costs about a millisecond per MB, a small fraction of decoding the Parquet.
        """
        uri = f"{m.uri}/{entry['name']}"
        try:
            data = self.store.get(uri)
        except FileNotFoundError:
            raise CorruptPart(_corrupt(m, entry, "is missing")) from None
        if len(data) != entry["bytes"]:
            raise CorruptPart(_corrupt(m, entry, f"holds {len(data)} bytes where its manifest recorded {entry['bytes']}"))
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptPart(_corrupt(m, entry, "has a different sha256 from the one its manifest recorded"))
        try:
            frame = pl.read_parquet(io.BytesIO(data))
        except Exception as exc:  # bytes that match the manifest but were never valid Parquet
            raise CorruptPart(_corrupt(m, entry, f"is not readable Parquet ({type(exc).__name__})")) from None
        if frame.height != entry["rows"]:
            raise CorruptPart(_corrupt(m, entry, f"holds {frame.height} rows where its manifest recorded {entry['rows']}"))
        return frame

    # -- directories (model checkpoints) ------------------------------------------------------
    def put_dir(self, local_dir: str | Path, uri: str, *, extra: dict[str, Any] | None = None) -> Manifest:
        """Upload a directory (a checkpoint) and commit it with a manifest, like a stage."""
        if self.is_done(uri):
            return self.manifest(uri)
        local_dir = Path(local_dir)
        target = self.store.local_path(uri)
        if target is None or target.resolve() != local_dir.resolve():
            self.store.delete_prefix(uri)
        files = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            self.store.put_file(path, f"{uri}/{rel}")
            files.append({"name": rel, "rows": 0, "bytes": path.stat().st_size, "sha256": _sha256_file(path)})
        manifest = {
            "uri": uri,
            "rows": 0,
            "files": files,
            "schema": {},
            "config_hash": config_hash(extra),
            "parents": [],
            "code_version": code_version(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(extra or {}),
        }
        self.store.put(f"{uri}/{MANIFEST}", json.dumps(manifest, indent=2, default=str).encode())
        return self.manifest(uri)

    def get_dir(self, uri: str, cache_root: str | Path) -> Path:
        """A local directory holding the committed directory at ``uri`` (downloaded once for S3)."""
        m = self.manifest(uri)
        local = self.store.local_path(uri)
        if local is not None:
            _check_sizes(m, local)
            return local
        dest = Path(cache_root) / m.sha256[:16]
        if not (dest / MANIFEST).exists():
            # A private download folder renamed into place: threads (Grow shards) and processes that
            # fetch the same checkpoint at once never write into each other's files.
            Path(cache_root).mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{dest.name}-", suffix=".partial"))
            try:
                for f in m.files:
                    self.store.get_file(f"{uri}/{f['name']}", tmp / f["name"])
                _check_sizes(m, tmp)
                (tmp / MANIFEST).write_text("{}")
                try:
                    tmp.rename(dest)
                except OSError:
                    if not (dest / MANIFEST).exists():  # not a copy someone else just finished: a real error
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # -- small JSON documents ----------------------------------------------------------------
    def put_json(self, uri: str, obj: Any) -> None:
        self.store.put(uri, json.dumps(obj, indent=2, default=str).encode())

    def get_json(self, uri: str) -> Any:
        return json.loads(self.store.get(uri))


def _check_sizes(m: Manifest, folder: Path) -> None:
    """Every file of a committed directory is there with its recorded size (hashing gigabytes of weights on
    every load would cost more than it catches; the size catches a truncated or replaced file)."""
    for f in m.files:
        try:
            size = (folder / f["name"]).stat().st_size
        except FileNotFoundError:
            raise CorruptPart(_corrupt(m, f, "is missing")) from None
        if size != f["bytes"]:
            raise CorruptPart(_corrupt(m, f, f"holds {size} bytes where its manifest recorded {f['bytes']}"))


def _corrupt(m: Manifest, entry: dict[str, Any], problem: str) -> str:
    return (
        f"Part {m.uri}/{entry['name']} {problem}, so the stage was changed after it was committed; re-run that "
        f"stage (delete {m.uri}/{MANIFEST} and run again) or start a new run with another --run-name."
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
