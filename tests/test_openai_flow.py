"""The OpenAI-compatible sampler from a recipe, as ``flywheel run`` builds it: a full ReST iteration whose
Grow samples come from the project's OpenAI-compatible test server (tests/openai_compat_server.py, a real
HTTP server on 127.0.0.1 over the transformers sampler), with the key only in the environment: afterwards it
is in no output, lake file, MLflow database, log or Prefect database.

Run: ``.venv/bin/python -m pytest tests/test_openai_flow.py -q``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.openai_compat_server import serve_completions

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
KEY = "sk-flywheel-openai-flow-7c1d"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from alignment.arithmetic import arithmetic_task
    from alignment.models import build_tiny_model

    task = arithmetic_task()
    texts = [*task.prompts["prompt"], *task.labelled["completion"], *task.eval["reference"]]
    return build_tiny_model(texts, tmp_path_factory.mktemp("served") / "model").resolve()


def run_cli(tmp: Path, *sets: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", "remote",
            "--set", f"lake=file://{tmp / 'lake'}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"]
    for s in sets:
        argv += ["--set", s]
    return subprocess.run(argv, cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=600)


def test_a_rest_iteration_grows_through_the_openai_sampler(model_dir, tmp_path):
    small = ["task.n_labelled=40", "task.n_prompts=24", "task.n_eval=16", "grow_steps=1", "grow.samples_per_prompt=2",
             "improve.epochs=1", f"model.path={model_dir}", "warm_start.enabled=false"]
    with serve_completions(model_dir, api_key=KEY) as server:
        proc = run_cli(tmp_path, *small, "grow.sampler=openai", f"grow.sampler_options.base_url={server.base_url}",
                       "grow.sampler_options.api_key_env=FLYWHEEL_TEST_KEY", env={"FLYWHEEL_TEST_KEY": KEY})
        served = server.state.requests_seen
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert served == 24  # one chat request per training prompt, each asking for n=2 samples
    samples = pl.read_parquet(list((tmp_path / "lake" / "samples" / "run=remote" / "iteration=1").glob("*.parquet")))
    grown = samples.filter(pl.col("sample_idx") >= 0)
    assert grown.height == 48 and set(grown["finish_reason"]) <= {"stop", "length"}
    # The key went only into the Authorization header: not in the output, the lake, MLflow, the run's
    # log, nor the Prefect database that holds the flow run's parameters (the test session's PREFECT_HOME).
    assert KEY not in proc.stdout + proc.stderr
    prefect_home = Path(os.environ["PREFECT_HOME"])
    assert list(prefect_home.glob("*.db")), "the run's flow run is recorded in this Prefect database"
    for path in [*tmp_path.rglob("*"), *prefect_home.rglob("*")]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_secret_written_into_the_recipe_is_refused(tmp_path):
    proc = run_cli(tmp_path, "grow.sampler=openai", "grow.sampler_options.base_url=http://127.0.0.1:9/v1",
                   f"grow.sampler_options.api_key={KEY}", env={})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flywheel:")]
    assert len(lines) == 1 and "api_key_env" in lines[0] and "Traceback" not in proc.stderr
    assert KEY not in proc.stdout + proc.stderr
