"""GPU stages: one GPU job per GPU, and optionally a fresh process each.

Grow shards, training, evaluation and the reference pass are GPU stages (scoring too with
``orchestration.score_on_gpu``); tasks/placement.py decides whether a stage runs in this process at
all or on a worker of another pool. ``run_gpu_stage(recipe, fn, *args)`` calls ``fn(*args)``:

- inside ``prefect.concurrency.sync.concurrency(orchestration.gpu_concurrency_limit, occupy=1)``
  when a Prefect server is configured (``PREFECT_API_URL``). The name may hold ``{host}`` (this
  machine's hostname) and ``{gpu}`` (its ``CUDA_VISIBLE_DEVICES``), so ``gpu-{host}-{gpu}`` names one
  limit per GPU: create each with one slot (``prefect gcl create gpu-node1-0 --limit 1``) and a GPU
  runs one stage at a time, even when a flow's Grow shards run side by side on the thread runner.
  A limit that does not exist on the server is skipped quietly (a server without GPU limits is the
  common case, and Prefect would warn about it at every stage), and the embedded default (no server
  configured) never asks for one, so a laptop run makes no extra API calls;
- in a fresh ``spawn`` subprocess when ``orchestration.isolate_gpu_stages`` is set, so the CUDA
  context, allocator caches and any leaked tensors die with the process and the next stage (or the
  next flow on the same worker) starts with the whole GPU. ``fn`` must be a module-level function and
  its arguments picklable (tasks only pass references). The child pays a Python + torch
  import (a few seconds), which is why this is off by default.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from alignment.recipe import Recipe

T = TypeVar("T")

# transformers' from_pretrained is not thread-safe (concurrent loads in one process fail with
# "Cannot copy out of meta tensor"), and shards on the thread runner load their models together.
MODEL_LOAD_LOCK = threading.Lock()


def prefect_server_configured() -> bool:
    """Whether ``PREFECT_API_URL`` names a server (read now, from the current settings)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def limit_name(recipe: Recipe) -> str:
    """The recipe's GPU concurrency limit, with ``{host}`` and ``{gpu}`` filled in for this process."""
    name = recipe.orchestration.gpu_concurrency_limit
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or "all"
    return name.replace("{host}", socket.gethostname()).replace("{gpu}", gpu.replace(",", "_"))


@contextlib.contextmanager
def gpu_slot(recipe: Recipe) -> Iterator[None]:
    """Hold one slot of the recipe's global GPU concurrency limit, when there is a server to ask."""
    name = limit_name(recipe)
    if not name or not prefect_server_configured() or not _limit_exists(name):
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1, strict=False):
        yield


def _limit_exists(name: str) -> bool:
    """Whether the server has a global concurrency limit ``name`` (one cheap request per GPU stage)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


def run_gpu_stage(recipe: Recipe, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` holding a GPU slot, in its own process if ``isolate_gpu_stages`` is set."""
    with gpu_slot(recipe):
        if recipe.orchestration.isolate_gpu_stages:
            return in_fresh_process(fn, *args)
        return fn(*args)


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a new ``spawn`` process and return its result (its exception is re-raised here)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_logged, fn, *args).result()


def _logged(fn: Callable[..., T], *args: Any) -> T:
    """In the child: the stage's ``flywheel`` log lines go to stderr, which the worker captures."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)-7s | %(name)s - %(message)s")
    return fn(*args)
