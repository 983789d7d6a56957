"""Object storage behind the lake: the local filesystem (``file://``) and S3 (``s3://``).

Both backends speak full URIs and give the same guarantees the lake's commit protocol needs:
``put`` is atomic per object (a reader sees the whole object or nothing), ``list`` is recursive
and sorted. Two conditional writes serve the run lease (``tasks.lake.runs``): ``put_if_absent`` creates
an object only where none exists, and ``put_if_unchanged`` replaces one only if it still holds the
bytes the caller read; each is atomic against the other and against itself, on one machine
(``file://``: a hard link and an ``flock`` on the folder) and across machines (S3: ``If-None-Match``
and ``If-Match``). The S3 backend lives in ``tasks.lake.s3`` and is imported only when an ``s3://`` URI is
opened, so the embedded default never touches boto3.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from alignment.errors import UserError


class Store(Protocol):
    def put(self, uri: str, data: bytes) -> None: ...
    def put_if_absent(self, uri: str, data: bytes) -> bool: ...
    def put_if_unchanged(self, uri: str, data: bytes, expected: bytes) -> bool: ...
    def get(self, uri: str) -> bytes: ...
    def exists(self, uri: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def move(self, src: str, dst: str) -> None: ...
    def size(self, uri: str) -> int: ...
    def put_file(self, local_path: str | Path, uri: str) -> None: ...
    def get_file(self, uri: str, local_path: str | Path) -> None: ...
    def local_path(self, uri: str) -> Path | None: ...
    def storage_options(self) -> dict[str, str] | None: ...


class LakeURIError(UserError):
    """A lake URI names a storage flywheel cannot use, or a folder it cannot write."""


def normalize_uri(uri: str) -> str:
    """Return a canonical lake URI: ``s3://bucket/prefix`` or ``file:///absolute/path`` (no trailing slash)."""
    uri = uri.rstrip("/")
    if uri.startswith("s3://"):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise LakeURIError(f"Unsupported lake URI {uri!r}: use file://PATH or s3://BUCKET/PREFIX.")
    return "file://" + str(Path(uri).expanduser().resolve())


def check_writable(uri: str) -> None:
    """For a ``file://`` lake: create its folder and a file in it, or raise one ``LakeURIError`` sentence.
    (An ``s3://`` lake's access is checked by its first request.)"""
    uri = normalize_uri(uri)
    if not uri.startswith("file://"):
        return
    path = LocalStore._path(uri)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tmp-probe-"):
            pass
    except OSError as exc:
        raise LakeURIError(
            f"The lake {uri} is not a folder flywheel can write ({type(exc).__name__}: {exc.strerror or exc}); "
            "set lake to a writable folder or an s3:// URI."
        ) from None


class LocalStore:
    """The local filesystem; writes go to a temporary file renamed into place (atomic on POSIX)."""

    @staticmethod
    def _path(uri: str) -> Path:
        return Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)

    def put(self, uri: str, data: bytes) -> None:
        path = self._path(uri)
        tmp = self._staged(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        """Create the file with ``data`` unless it exists; False if it did (a hard link never overwrites)."""
        path = self._path(uri)
        tmp = self._staged(path, data)
        try:
            with _folder_lock(path.parent):
                os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put_if_unchanged(self, uri: str, data: bytes, expected: bytes) -> bool:
        """Replace the file with ``data`` only if it still holds ``expected``; False otherwise."""
        path = self._path(uri)
        tmp = self._staged(path, data)
        try:
            with _folder_lock(path.parent):
                try:
                    current = path.read_bytes()
                except FileNotFoundError:
                    return False
                if current != expected:
                    return False
                os.replace(tmp, path)
                return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _staged(path: Path, data: bytes) -> Path:
        """``data`` written and synced to a temporary file beside ``path``, ready to be renamed or linked."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

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

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (one atomic rename: ``dst`` appears whole or not at all)."""
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), target)

    def size(self, uri: str) -> int:
        return self._path(uri).stat().st_size

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


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder: conditional writes in it happen one at a time.

    The kernel drops the lock when its holder dies, so a killed process never leaves it held.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def open_store(uri: str, s3: dict[str, Any] | None = None) -> Store:
    """The store for ``uri``'s scheme; ``s3`` holds optional endpoint/region/credential overrides."""
    if uri.startswith("s3://"):
        from tasks.lake.s3 import S3Store

        return S3Store(**(s3 or {}))
    return LocalStore()
