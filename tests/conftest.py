"""Test-wide settings: offline, isolated Prefect home, and the shared fixtures.

Nothing here mocks flywheel or a service we ship with: flows run on the embedded Prefect API,
MLflow on SQLite in a temporary directory, S3 on a real SeaweedFS server (tests/s3_fixtures.py),
and a real Prefect server where a test is about deployments or workers (tests/prefect_fixtures.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_fixtures", "tests.prefect_fixtures"]

# Before Prefect, MLflow or transformers are imported by any test module.
_HOME = Path(tempfile.mkdtemp(prefix="flywheel-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_HOME / 'mlflow-default.db'}")
# On 2 shared cores, OpenMP threads that spin while waiting slow torch down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Prefect binds its console handler to the stderr current at its first import; importing it here,
# before any test captures stderr, keeps a capsys test from leaving it a closed stream.
import prefect  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory so ./lake, ./mlflow and ./.flywheel are per test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in tiny model (Llama, chat template, two end ids) over the arithmetic task's characters."""
    from alignment.arithmetic import arithmetic_task
    from alignment.models import build_tiny_model

    task = arithmetic_task()
    texts = [*task.prompts["prompt"], *task.labelled["completion"], *task.eval["reference"]]
    return build_tiny_model(texts, tmp_path_factory.mktemp("tiny-model"))


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server while pytest's output is still open, so its goodbye line has
    somewhere to go (at interpreter exit the captured streams are closed and logging complains)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return
    import logging

    logging.disable(logging.CRITICAL)
    try:
        if "flows.server" in sys.modules:  # the one ``flywheel run`` starts (flows/server.py)
            sys.modules["flows.server"].stop()
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    finally:
        logging.disable(logging.NOTSET)
