"""A ReST iteration whose Grow samples come from ``transformers serve``, transformers' own OpenAI-compatible
server, started here on 127.0.0.1 over a locally built chat model (nothing is downloaded).

That server answers ``/v1/chat/completions`` with one choice whatever ``n`` is ("Ignoring unsupported fields
in the request: {'n'}"), so the OpenAI sampler falls back to one request per sample, each with its own seed.
Two facts about the server shape this test:

- it samples only when the model's ``generation_config.json`` says ``do_sample: true`` (instruct models ship
  it so); a request's ``temperature`` alone leaves a model without it greedy, so the served model here has it;
- it applies ``seed`` with ``torch.manual_seed`` on its event loop while generation runs on another thread, so
  concurrent requests take each other's seeds: its samples repeat for a seed only with
  ``grow.sampler_options.concurrency: 1``, which this test uses.

Slow tier; needs the ``serving`` extra (``pip install -c requirements.lock -e '.[serving]'``).
Run: ``.venv/bin/python -m pytest tests/test_transformers_serve.py -q -m slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest

from tests.openai_compat_server import free_port
from tests.prefect_fixtures import stop_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("openai") is None, reason="needs the serving extra: pip install -e '.[serving]'"),
]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
PROMPTS = 24
STARTUP_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The built-in tiny chat model, with ``do_sample: true`` in its generation config as instruct models ship it."""
    from alignment.arithmetic import arithmetic_task
    from alignment.models import build_tiny_model

    task = arithmetic_task()
    texts = [*task.prompts["prompt"], *task.labelled["completion"], *task.eval["reference"]]
    model = build_tiny_model(texts, tmp_path_factory.mktemp("served") / "model").resolve()
    config = model / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "do_sample": True}, indent=2))
    return model


@pytest.fixture(scope="module")
def transformers_serve(model_dir, tmp_path_factory):
    """``transformers serve MODEL`` on a free loopback port, offline; yields (base_url, log path)."""
    home = tmp_path_factory.mktemp("transformers-serve")
    port, log = free_port(), home / "serve.log"
    cli = Path(sys.executable).parent / "transformers"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as fh:
        server = subprocess.Popen(
            [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "info"],
            cwd=home, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert server.poll() is None, f"transformers serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"transformers serve did not answer within {STARTUP_TIMEOUT_S} s"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        stop_process(server)


def flywheel_run(workdir: Path, run: str, model_dir: Path, base_url: str) -> subprocess.CompletedProcess:
    sets = [
        "task.n_labelled=40", f"task.n_prompts={PROMPTS}", "task.n_eval=16", "grow_steps=1", "grow.samples_per_prompt=4",
        "improve.epochs=1", f"model.path={model_dir}", "warm_start.enabled=false", "grow.sampler=openai",
        f"grow.sampler_options.base_url={base_url}", "grow.sampler_options.concurrency=1",
        f"lake=file://{workdir / 'lake'}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]
    argv = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", run]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def grown(workdir: Path, run: str) -> pl.DataFrame:
    parts = list((workdir / "lake" / "scored" / f"run={run}" / "iteration=1").glob("*.parquet"))
    return pl.read_parquet(parts).filter(pl.col("sample_idx") >= 0).sort("prompt_id", "sample_idx")


def test_a_rest_iteration_grows_four_samples_per_prompt_through_transformers_serve(model_dir, transformers_serve, tmp_path):
    base_url, server_log = transformers_serve
    first = flywheel_run(tmp_path, "served-a", model_dir, base_url)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    a = grown(tmp_path, "served-a")
    per_prompt = a.group_by("prompt_id").agg(pl.len().alias("n"), pl.col("sample_idx").alias("idx"),
                                             pl.col("completion").n_unique().alias("distinct"))
    assert per_prompt.height == PROMPTS and set(per_prompt["n"]) == {4}
    assert all(sorted(idx) == [0, 1, 2, 3] for idx in per_prompt["idx"].to_list())
    # Each sample its own seed at temperature 1: a prompt's samples differ (a tiny random model may repeat
    # a short completion now and then, so most prompts, not all).
    assert (per_prompt["distinct"] > 1).sum() >= PROMPTS * 3 // 4, per_prompt.sort("prompt_id")
    assert (a["num_tokens"] > 0).all()  # the server's usage, per sample
    assert "Ignoring unsupported fields in the request: {'n'}" in server_log.read_text()
    assert (tmp_path / ".flywheel" / "logs" / "served-a.log").read_text().count("ignores n") == 1

    # The same seed on a rerun gives the same samples (one request at a time; see the module docstring).
    again = flywheel_run(tmp_path, "served-b", model_dir, base_url)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    b = grown(tmp_path, "served-b")
    assert b.select("prompt_id", "sample_idx", "completion").equals(a.select("prompt_id", "sample_idx", "completion"))
