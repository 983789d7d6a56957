"""What a lake commit records, and the errors of reading one back: the manifest of a stage (its parts'
rows, sizes and hashes, the config that made it) and the code version and config hash stamped on it.
``tasks.lake.store.Lake`` writes and reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from alignment.errors import UserError


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


class StageChanged(UserError):
    """A committed stage was made with a config other than the one a run would use now."""


class CorruptPart(UserError):
    """A part of a committed stage no longer matches what its manifest recorded."""


@dataclass(frozen=True)
class Manifest:
    uri: str
    rows: int
    files: list[dict[str, Any]]
    schema: dict[str, str]
    config_hash: str
    parents: list[str]
    sha256: str  # of the manifest itself: the dataset's identity for lineage
    manifest_uri: str = ""


def check_sizes(m: Manifest, folder: Path) -> None:
    """Every file of a committed directory is there with its recorded size (hashing gigabytes of weights on
    every load would cost more than it catches; the size catches a truncated or replaced file)."""
    for f in m.files:
        try:
            size = (folder / f["name"]).stat().st_size
        except FileNotFoundError:
            raise CorruptPart(corrupt_message(m, f, "is missing")) from None
        if size != f["bytes"]:
            raise CorruptPart(corrupt_message(m, f, f"holds {size} bytes where its manifest recorded {f['bytes']}"))


def corrupt_message(m: Manifest, entry: dict[str, Any], problem: str) -> str:
    return (
        f"Part {m.uri}/{entry['name']} {problem}, so the stage was changed after it was committed; re-run that "
        f"stage (delete {m.manifest_uri} and run again) or start a new run with another --run-name."
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
