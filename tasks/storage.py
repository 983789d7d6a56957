"""Object storage behind the lake: the local filesystem (``file://``) and S3 (``s3://``).

Both backends speak full URIs and give the same guarantees the lake's commit protocol needs:
``put`` is atomic per object (a reader sees the whole object or nothing), ``list`` is recursive
and sorted. The S3 backend lives in ``tasks.s3`` and is imported only when an ``s3://`` URI is
opened, so the embedded default never touches boto3.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse


class Store(Protocol):
    def put(self, uri: str, data: bytes) -> None: ...
    def get(self, uri: str) -> bytes: ...
    def exists(self, uri: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def put_file(self, local_path: str | Path, uri: str) -> None: ...
    def get_file(self, uri: str, local_path: str | Path) -> None: ...
    def local_path(self, uri: str) -> Path | None: ...
    def storage_options(self) -> dict[str, str] | None: ...


def normalize_uri(uri: str) -> str:
    """Return a canonical lake URI: ``s3://bucket/prefix`` or ``file:///absolute/path`` (no trailing slash)."""
    uri = uri.rstrip("/")
    if uri.startswith("s3://"):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"Unsupported lake URI {uri!r}: use file://PATH or s3://BUCKET/PREFIX.")
    return "file://" + str(Path(uri).expanduser().resolve())


class LocalStore:
    """The local filesystem; writes go to a temporary file renamed into place (atomic on POSIX)."""

    @staticmethod
    def _path(uri: str) -> Path:
        return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)

    def put(self, uri: str, data: bytes) -> None:
        path = self._path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, uri: str) -> bytes:
        return self._path(uri).read_bytes()

    def exists(self, uri: str) -> bool:
        return self._path(uri).exists()

    def list(self, prefix: str) -> list[str]:
        root = self._path(prefix)
        if not root.exists():
            return []
        return sorted(
            "file://" + str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def put_file(self, local_path: str | Path, uri: str) -> None:
        dest = self._path(uri)
        if Path(local_path).resolve() == dest.resolve():
            return
        self.put(uri, Path(local_path).read_bytes())

    def get_file(self, uri: str, local_path: str | Path) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(uri), local_path)

    def local_path(self, uri: str) -> Path | None:
        return self._path(uri)

    def storage_options(self) -> dict[str, str] | None:
        return None


def open_store(uri: str, s3: dict[str, Any] | None = None) -> Store:
    """The store for ``uri``'s scheme; ``s3`` holds optional endpoint/region/credential overrides."""
    if uri.startswith("s3://"):
        from tasks.s3 import S3Store

        return S3Store(**(s3 or {}))
    return LocalStore()
