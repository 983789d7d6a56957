"""The lake: each stage one Parquet table that any engine reads, committed by a manifest; models kept apart.

Layout (identical under ``file://`` and ``s3://``)::

    {lake}/{stage}/run={run}/iteration={g}[/step={i}]/part-{shard:05d}.parquet   <- one table per stage
    {lake}/models/{run}/iteration={g}/{base|checkpoint}[/step={i}]/...           <- weights, tokenizers
    {lake}/runs/{run}/stages/{stage}/iteration={g}[/step={i}]/_manifest.json     <- a partition's commit
    {lake}/runs/{run}/staging/{stage}/iteration={g}[/step={i}]/part-*.parquet    <- parts not yet committed
    {lake}/runs/{run}/{run.json, lease.json, summary.json}                       <- what the run is

A table prefix (``{lake}/scored``) holds nothing but that stage's Parquet, partitioned hive-style by
``run``, ``iteration`` and ``step``: ``pyarrow.dataset(f"{lake}/scored", partitioning="hive")``,
``pl.scan_parquet(f"{lake}/scored/**/*.parquet")`` and DuckDB's ``read_parquet(..., hive_partitioning
=true)`` read every scored row of every run. Partition keys live only in the path, never as columns.

Commit protocol (docs/lake.md has the measured comparison with Delta Lake): parts are written to the
run's ``staging`` area, outside every table, as long as a stage takes (a Grow shard writes its part
when it finishes); ``commit`` then moves them into the partition (a rename on ``file://``, a server-side
copy on ``s3://``), checks their sizes and writes the manifest last. A stage is done only when its
manifest exists; flywheel's readers read exactly the files the manifest lists, verified by hash. A
plain scan of a table sees a partition's parts from their move on, so the one window in which it can
see an uncommitted partition is the moves themselves (one rename per part locally); a writer killed
in it leaves those parts without a manifest, and the resumed run clears and rewrites the partition.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from tasks.lake.cache import MANIFESTS, PARTS, link_into_cache
from tasks.lake.manifest import (
    CorruptPart, Manifest, StageChanged, StageNotFound, check_sizes, code_version, config_hash, corrupt_message,
    sha256_file,
)
from tasks.lake.paths import MANIFEST, PARTITION_KEYS, Address, check_name, parse
from tasks.lake.storage import Store, normalize_uri, open_store

class Lake:
    """Read and write stages under one lake root."""

    def __init__(self, uri: str, s3: dict[str, Any] | None = None):
        self.uri = normalize_uri(uri)
        self.store: Store = open_store(self.uri, s3)

    # -- addresses ---------------------------------------------------------------------------
    def run_uri(self, run: str) -> str:
        """``{lake}/runs/{run}``: the run's own records (identity, lease, summary, manifests), outside every table."""
        return f"{self.uri}/runs/{check_name(run, 'run name')}"

    def stage_uri(self, run: str, iteration: int, stage: str, step: int | None = None) -> str:
        return Address(self.uri, stage, check_name(run, "run name"), iteration, step).uri

    def address(self, uri: str) -> Address | None:
        """The stage a table partition, model directory or manifest URI of this lake names; None for any other URI."""
        return parse(self.uri, uri)

    def address_of(self, stage_uri: str) -> Address:
        """The stage ``stage_uri`` names (``StageNotFound`` if it names none of this lake)."""
        found = self.address(stage_uri)
        if found is None:
            raise StageNotFound(f"{stage_uri} is not a stage of the lake {self.uri}.")
        return found

    def manifest_uri(self, stage_uri: str) -> str:
        return self.address_of(stage_uri).manifest_uri

    def committed(self, run: str | None = None) -> list[Address]:
        """Every committed table partition of ``run`` (or of every run), from the manifests under ``runs/``."""
        prefix = f"{self.uri}/runs" if run is None else f"{self.run_uri(run)}/stages"
        found = (self.address(u) for u in self.store.list(prefix) if u.endswith("/" + MANIFEST))
        return [a for a in found if a is not None]

    # -- commit protocol ---------------------------------------------------------------------
    def is_done(self, stage_uri: str) -> bool:
        uri = self.manifest_uri(stage_uri)
        return MANIFESTS.get(uri) is not None or self.store.exists(uri)

    def clear(self, stage_uri: str) -> None:
        """Remove whatever an unfinished attempt at an uncommitted stage left: its parts and its staged parts."""
        a = self.address_of(stage_uri)
        MANIFESTS.forget(a.manifest_uri)
        self.store.delete_prefix(a.uri)
        if a.is_table:
            self.store.delete_prefix(a.staging_uri)

    def manifest(self, stage_uri: str) -> Manifest:
        return self._parse_manifest(stage_uri, self._manifest_bytes(stage_uri))

    def _manifest_bytes(self, stage_uri: str) -> bytes:
        """A committed stage's manifest, fetched once per process while a run's lease is held (``tasks.lake.cache``)."""
        uri = self.manifest_uri(stage_uri)
        raw = MANIFESTS.get(uri)
        if raw is None:
            try:
                raw = self.store.get(uri)
            except (FileNotFoundError, KeyError) as exc:
                raise StageNotFound(f"No committed stage at {stage_uri} (it has no {MANIFEST}).") from exc
            MANIFESTS.put(uri, raw)
        return raw

    def _parse_manifest(self, stage_uri: str, raw: bytes) -> Manifest:
        data = json.loads(raw)
        return Manifest(
            uri=stage_uri,
            rows=data["rows"],
            files=data["files"],
            schema=data["schema"],
            config_hash=data["config_hash"],
            parents=data["parents"],
            sha256=hashlib.sha256(raw).hexdigest(),
            manifest_uri=self.manifest_uri(stage_uri),
        )

    def manifest_doc(self, stage_uri: str) -> dict[str, Any]:
        """The committed stage's whole manifest document, with what its writer added (metrics, drop counts)."""
        return json.loads(self._manifest_bytes(stage_uri))

    def check_config(self, stage_uri: str, config: Any) -> Manifest:
        """The committed stage's manifest, if it was made with ``config``; ``StageChanged`` if not."""
        m = self.manifest(stage_uri)
        if m.config_hash != config_hash(config):
            raise StageChanged(
                f"The committed stage {stage_uri} was made with other settings than this run's (config hash "
                f"{m.config_hash}, now {config_hash(config)}); delete {m.manifest_uri} to re-run it, or use another --run-name."
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
        (whether it was made with this ``config`` is for the caller to ask: ``check_config``).

        The frames are computed already, so their parts go straight into the partition, one upload
        each, followed by the manifest: staging them first would only add a move per part.
        """
        if self.is_done(stage_uri):
            return self.manifest(stage_uri)
        self.clear(stage_uri)
        files = []
        for shard, frame in enumerate(shards):
            files.append(self.write_part(stage_uri, shard, frame, staged=False))
        return self.commit(stage_uri, files, config=config, parents=parents, extra=extra)

    def write_part(self, stage_uri: str, shard: int, frame: pl.DataFrame, *, staged: bool = True) -> dict[str, Any]:
        """Write one part of an uncommitted stage: to the run's staging area, from where ``commit`` moves it into
        the table (a shard of a stage that is still computing), or, with ``staged=False``, into the partition."""
        clash = [k for k in PARTITION_KEYS if k in frame.columns]
        if clash:
            raise ValueError(f"Columns {clash} are partition keys of the lake path and must not be written as columns.")
        buf = io.BytesIO()
        frame.write_parquet(buf, compression="zstd", statistics=True)
        data = buf.getvalue()
        name = f"part-{shard:05d}.parquet"
        self.store.put(f"{self.address_of(stage_uri).staging_uri if staged else stage_uri}/{name}", data)
        arrow = pq.read_metadata(io.BytesIO(data)).schema.to_arrow_schema()
        return {
            "name": name, "rows": frame.height, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "schema": {n: str(t) for n, t in zip(arrow.names, arrow.types)}, "staged": staged,
        }  # fmt: skip

    def commit(
        self,
        stage_uri: str,
        files: list[dict[str, Any]],
        *,
        config: Any = None,
        parents: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Move the staged parts into the table and write the manifest last.

        A move is a rename (``file://``) or a server-side copy (``s3://``) of the very bytes ``write_part``
        wrote and hashed, so it needs no read-back. Safe to repeat after a failure part-way: a part an
        earlier attempt already moved is found in place and checked by its size.
        """
        a = self.address_of(stage_uri)
        files = [dict(f) for f in files]
        schema = next((f["schema"] for f in files if f.get("schema")), {})
        for f in files:
            f.pop("schema", None)
            if not f.pop("staged", True):
                continue  # written into the partition by write_stage a moment ago
            staged, final = f"{a.staging_uri}/{f['name']}", f"{stage_uri}/{f['name']}"
            try:
                self.store.move(staged, final)
            except FileNotFoundError:  # moved by an earlier attempt at this commit, or lost
                try:
                    size = self.store.size(final)
                except FileNotFoundError:
                    raise OSError(f"Part {final} is missing: it was neither staged nor moved into place.") from None
                if size != f["bytes"]:
                    raise OSError(f"Part {final} holds {size} bytes, expected {f['bytes']}.") from None
        manifest = {
            "stage": a.label,
            "table": a.stage if a.is_table else None,
            "partition": a.partition if a.is_table else None,
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
        raw = json.dumps(manifest, indent=2, default=str).encode()
        self.store.put(a.manifest_uri, raw)
        MANIFESTS.put(a.manifest_uri, raw)
        return self._parse_manifest(stage_uri, raw)

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
            raise StageNotFound(f"The stage {stage_uri} has no part {name} in its manifest.")
        return self._read_part(m, entry)

    def _read_part(self, m: Manifest, entry: dict[str, Any]) -> pl.DataFrame:
        """A part's rows, after checking its size, sha256 and row count against the manifest (``CorruptPart``).

        Hashing costs about a millisecond per MB, a small fraction of decoding the Parquet. A committed
        stage never changes, so the rows read and verified once are kept (``tasks.lake.cache.PARTS``) for as long as its
        manifest is the very same document: a stage read by several tasks of one process (scored is read
        by the filter, the metrics and the artifacts) is fetched and decoded once.
        """
        key = (m.manifest_uri, m.sha256, entry["name"])
        cached = PARTS.get(key)
        if cached is not None:
            return cached
        frame = self._fetch_part(m, entry)
        PARTS.put(key, frame)
        return frame.clone()

    def _fetch_part(self, m: Manifest, entry: dict[str, Any]) -> pl.DataFrame:
        uri = f"{m.uri}/{entry['name']}"
        try:
            data = self.store.get(uri)
        except FileNotFoundError:
            raise CorruptPart(corrupt_message(m, entry, "is missing")) from None
        if len(data) != entry["bytes"]:
            raise CorruptPart(corrupt_message(m, entry, f"holds {len(data)} bytes where its manifest recorded {entry['bytes']}"))
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptPart(corrupt_message(m, entry, "has a different sha256 from the one its manifest recorded"))
        try:
            frame = pl.read_parquet(io.BytesIO(data))
        except Exception as exc:  # bytes that match the manifest but were never valid Parquet
            raise CorruptPart(corrupt_message(m, entry, f"is not readable Parquet ({type(exc).__name__})")) from None
        if frame.height != entry["rows"]:
            raise CorruptPart(corrupt_message(m, entry, f"holds {frame.height} rows where its manifest recorded {entry['rows']}"))
        return frame

    # -- directories (model checkpoints) ------------------------------------------------------
    def put_dir(self, local_dir: str | Path, uri: str, *, extra: dict[str, Any] | None = None,
                cache_root: str | Path | None = None) -> Manifest:
        """Upload a directory (a checkpoint) and commit it with a manifest, like a stage.

        With ``cache_root`` (the cache ``get_dir`` uses), the uploaded files are also linked into this
        machine's cache under the new manifest, so the next stage here loads the checkpoint it just
        trained without downloading it back."""
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
            files.append({"name": rel, "rows": 0, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
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
        raw = json.dumps(manifest, indent=2, default=str).encode()
        self.store.put(self.manifest_uri(uri), raw)
        MANIFESTS.put(self.manifest_uri(uri), raw)
        committed = self._parse_manifest(uri, raw)
        if cache_root is not None and target is None:
            link_into_cache(local_dir, Path(cache_root) / committed.sha256[:16])
        return committed

    def get_dir(self, uri: str, cache_root: str | Path) -> Path:
        """A local directory holding the committed directory at ``uri`` (downloaded once for S3)."""
        m = self.manifest(uri)
        local = self.store.local_path(uri)
        if local is not None:
            check_sizes(m, local)
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
                check_sizes(m, tmp)
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
