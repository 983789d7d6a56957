"""The lake: every stage one Parquet table any engine reads, committed by a manifest; models kept apart; run records.

A library, not a stage: it imports neither Prefect nor MLflow (``tests/test_layers.py`` checks it), so
a worker, a notebook or a script reads and writes the lake with it alone. Everything outside this
package reaches the lake through the names below.

- ``paths``: where things lie and the names allowed in them (``Address``, ``parse``, ``check_name``);
- ``storage`` / ``s3``: the storage backends behind one ``Store`` protocol (``file://`` and ``s3://``);
- ``manifest``: what a commit records (rows, sizes, hashes, config hash, code version);
- ``store``: ``Lake``, the commit protocol (stage parts, move them in, write the manifest last);
- ``cache``: what a process keeps of the lake so it fetches each thing once;
- ``runs``: a run's identity record and its lease (one writer per run).

The S3 backend's names (``S3Store``, ``LakeAccessError``, ``split_uri``) load boto3 on first use only.
"""

from __future__ import annotations

from typing import Any

from tasks.lake.manifest import (
    CorruptPart, Manifest, StageChanged, StageNotFound, code_version, config_hash, sha256_file,
)
from tasks.lake.paths import MANIFEST, MODELS, NAME_RULE, PARTITION_KEYS, TABLES, Address, BadName, check_name, parse
from tasks.lake.runs import (
    LEASE_FILE, RUN_FILE, RunBusy, RunChanged, RunLease, check_names, default_run_name, flatten, guard_run,
    precheck_run, release,
)
from tasks.lake.storage import LakeURIError, LocalStore, Store, check_writable, normalize_uri, open_store
from tasks.lake.store import Lake

_S3_NAMES = ("S3Store", "LakeAccessError", "split_uri")

__all__ = [
    "LEASE_FILE", "MANIFEST", "MODELS", "NAME_RULE", "PARTITION_KEYS", "RUN_FILE", "TABLES", "Address", "BadName",
    "CorruptPart", "Lake", "LakeURIError", "LocalStore", "Manifest", "RunBusy", "RunChanged", "RunLease",
    "StageChanged", "StageNotFound", "Store", "check_name", "check_names", "check_writable", "code_version",
    "config_hash", "default_run_name", "flatten", "guard_run", "normalize_uri", "open_store", "parse", "precheck_run",
    "release", "sha256_file", *_S3_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _S3_NAMES:
        from tasks.lake import s3

        return getattr(s3, name)
    raise AttributeError(f"module 'tasks.lake' has no attribute {name!r}")
