"""GPU stages: a fresh process per stage when ``isolate_gpu_stages`` is set, no slot without a server.

The concurrency slot itself is exercised against a real Prefect server in tests/test_serve.py.
"""

from __future__ import annotations

import os

import pytest

from alignment.recipe import Recipe
from tasks.gpu import gpu_slot, prefect_server_configured, run_gpu_stage


def _recipe(isolate: bool) -> Recipe:
    return Recipe.model_validate({"name": "gpu", "orchestration": {"isolate_gpu_stages": isolate}})


def test_isolated_stage_runs_in_its_own_process():
    assert run_gpu_stage(_recipe(False), os.getpid) == os.getpid()
    child = run_gpu_stage(_recipe(True), os.getpid)
    assert child != os.getpid()
    assert run_gpu_stage(_recipe(True), os.getpid) != child  # a new process every stage


def test_isolated_stage_raises_the_stage_error():
    with pytest.raises(FileNotFoundError, match="no-such-file"):
        run_gpu_stage(_recipe(True), os.stat, "/no-such-file")


def test_embedded_default_asks_for_no_slot(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}):
        assert not prefect_server_configured()
        with gpu_slot(_recipe(False)):  # no server: a plain block, no API call
            pass


def test_limit_name_per_gpu(monkeypatch):
    import socket

    from tasks.gpu import limit_name

    recipe = Recipe.model_validate({"name": "gpu", "orchestration": {"gpu_concurrency_limit": "gpu-{host}-{gpu}"}})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert limit_name(recipe) == f"gpu-{socket.gethostname()}-1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert limit_name(recipe) == f"gpu-{socket.gethostname()}-all"
    assert limit_name(_recipe(False)) == "gpu"
