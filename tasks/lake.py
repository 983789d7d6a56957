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
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

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
        return f"{self.uri}/{run}"

    def stage_uri(self, run: str, iteration: int, stage: str, step: int | None = None) -> str:
        uri = f"{self.uri}/{run}/iteration={iteration}/{stage}"
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

    def write_stage(
        self,
        stage_uri: str,
        shards: list[pl.DataFrame],
        *,
        config: Any = None,
        parents: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Commit ``shards`` as the stage at ``stage_uri``; a stage already committed is left as it is."""
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
        """The rows of a committed stage, read from exactly the files its manifest lists."""
        m = self.manifest(stage_uri)
        frames = [pl.read_parquet(io.BytesIO(self.store.get(f"{stage_uri}/{f['name']}"))) for f in m.files]
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]

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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
