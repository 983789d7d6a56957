"""What a process keeps of the lake so it fetches each thing once: a held run's manifests, verified parts of
committed stages, and checkpoints it just uploaded (linked into the local model cache)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import polars as pl

from tasks.lake.paths import MANIFEST


def link_into_cache(local_dir: Path, dest: Path) -> None:
    """``local_dir``'s files hard-linked (copied across filesystems) into ``dest``, renamed into place whole."""
    if (dest / MANIFEST).exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-", suffix=".partial"))
    try:
        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(local_dir, tmp, dirs_exist_ok=True, copy_function=link)
        (tmp / MANIFEST).write_text("{}")
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / MANIFEST).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _ManifestCache:
    """Manifests of the runs whose lease this process holds (``hold``), as read or written here.

    With the lease, this process is the run's one writer: a committed manifest of the run changes only
    through its own ``clear`` (which forgets it), so each is fetched once instead of once per
    ``is_done``/``read`` (a tenth of an S3 iteration's lake time). Of any other run nothing is kept.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._docs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _prefixes(lake_uri: str, run: str) -> tuple[str, str]:
        root = lake_uri.rstrip("/")
        return f"{root}/runs/{run}/", f"{root}/models/{run}/"

    def hold(self, lake_uri: str, run: str) -> None:
        """The run's lease was just taken: start afresh (a manifest may have changed while it was not held)."""
        self.release(lake_uri, run)
        with self._lock:
            self._held.update(self._prefixes(lake_uri, run))

    def release(self, lake_uri: str, run: str) -> None:
        prefixes = self._prefixes(lake_uri, run)
        with self._lock:
            self._held.difference_update(prefixes)
            self._docs = {k: v for k, v in self._docs.items() if not k.startswith(prefixes)}

    def get(self, uri: str) -> bytes | None:
        with self._lock:
            return self._docs.get(uri)

    def put(self, uri: str, raw: bytes) -> None:
        with self._lock:
            if uri.startswith(tuple(self._held)):
                self._docs[uri] = raw

    def forget(self, uri: str) -> None:
        with self._lock:
            self._docs.pop(uri, None)


MANIFESTS = _ManifestCache()


def hold_manifests(lake_uri: str, run: str) -> None:
    """Keep ``run``'s manifests in this process from now on: its caller has just taken the run's lease."""
    MANIFESTS.hold(lake_uri, run)


def drop_manifests(lake_uri: str, run: str) -> None:
    """Stop keeping ``run``'s manifests: its lease is released."""
    MANIFESTS.release(lake_uri, run)


class _PartCache:
    """Verified parts of committed stages, newest last, up to ``max_bytes`` of frames (least recently used out)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self._bytes = max_bytes, 0
        self._frames: OrderedDict[tuple[str, str, str], pl.DataFrame] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> pl.DataFrame | None:
        with self._lock:
            frame = self._frames.get(key)
            if frame is None:
                return None
            self._frames.move_to_end(key)
            return frame.clone()  # a frame of its own: nothing a caller does reaches the cache

    def put(self, key: tuple[str, str, str], frame: pl.DataFrame) -> None:
        size = frame.estimated_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._frames:
                return
            self._frames[key], self._bytes = frame, self._bytes + size
            while self._bytes > self.max_bytes:
                _, old = self._frames.popitem(last=False)
                self._bytes -= old.estimated_size()


PARTS = _PartCache(max_bytes=256 << 20)
