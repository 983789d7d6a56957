"""Commands that need no model stay cheap, and the console stays quiet.

``flywheel stack status``, ``flywheel --help``, ``--version``, ``flywheel inspect``'s error path and ``flywheel run``
with a mistake that needs no model to find import neither torch nor transformers (each costs seconds
on a small machine: a typo is one sentence in seconds); every command switches Prefect and
MLflow telemetry off unless the user set otherwise; a Prefect server without a GPU concurrency limit
gets no "limit does not exist" warning from every GPU stage.

Run: ``.venv/bin/python -m pytest tests/test_cli_cost.py -q``
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.recipe import Recipe

# Runs ``flows.cli.main`` with the given arguments, then prints what it loaded and set, as JSON.
PROBE = """
import json, os, sys
from flows.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
keys = ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED")
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules),
                  "env": {k: os.environ.get(k) for k in keys}}))
"""


def probe(tmp_path, *args: str, **env: str) -> tuple[dict, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "DO_NOT_TRACK", "MLFLOW_DISABLE"))}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["stack", "status"], ["--help"], ["--version"], ["stack", "--help"],
                                  ["inspect", "file:///no/such/lake/run"]])
def test_commands_without_a_model_load_no_model_library(tmp_path, argv):
    out, text = probe(tmp_path, *argv)
    assert out["heavy"] == [], text
    if argv[0] == "inspect":  # the error path: one sentence, exit 2, still no torch
        assert out["rc"] == 2 and "flywheel: Nothing committed under file:///no/such/lake/run" in text
    if argv == ["--version"]:  # the installed package's own version
        from importlib.metadata import version

        assert out["rc"] == 0 and f"flywheel {version('flywheel')}" in text
    if argv == ["stack", "status"]:  # nothing running here: each service reported stopped
        assert out["rc"] == 1 and text.count("stopped") == 3


RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "arithmetic-rest.yaml")


@pytest.mark.parametrize("args, says", [
    (["--run-name", "a/b"], "contains '/'"),
    (["--set", "task.builtin=null", "--set", "task.prompts=nope.jsonl", "--set", "task.eval=nope.jsonl"], "does not exist"),
    (["--set", "reward=exact-match"], "Unknown reward 'exact-match'"),
    (["--set", "reward=[exact_match, nope]"], "Unknown reward 'nope'"),
    (["--set", "reward=no_such_module:score"], "'no_such_module'"),
    (["--set", "mlflow.tracking_uri=http://127.0.0.1:9"], "cannot be reached"),
    (["--set", "lake=gs://bucket/lake"], "gs://bucket/lake"),
    (["--set", "grow.sampler=openai"], "needs 'base_url'"),
    (["--set", "model.path=."], "no config.json"),
], ids=["run-name", "prompt-file", "reward-name", "ensemble-member", "reward-module", "tracking-down", "lake-scheme", "openai-options",
        "model-folder"])
def test_run_finds_a_mistake_that_needs_no_model_without_loading_one(tmp_path, args, says):
    out, text = probe(tmp_path, "run", RECIPE, *args)
    assert out["rc"] == 2 and says in text, text
    assert out["heavy"] == [], text


def test_telemetry_is_off_unless_the_user_says_otherwise(tmp_path):
    out, _ = probe(tmp_path, "stack", "status")
    assert out["env"] == {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out, _ = probe(tmp_path, "stack", "status", MLFLOW_DISABLE_TELEMETRY="false")
    assert out["env"]["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_no_gpu_limit_warning_without_a_gpu_limit(api):
    """A server without the recipe's GPU limit: the stage runs, nothing is held, nothing is warned."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from tasks.gpu import gpu_slot

    name = f"gpu-cost-test-{os.getpid()}"
    recipe = Recipe.model_validate({"name": "gpu", "orchestration": {"gpu_concurrency_limit": name}})
    @flow
    def one_gpu_stage() -> None:  # Prefect warns through the run logger, so inside a flow run
        with gpu_slot(recipe):
            pass

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    prefect_logger = logging.getLogger("prefect")  # Prefect's loggers do not propagate to the root
    prefect_logger.addHandler(handler)
    try:
        one_gpu_stage()
    finally:
        prefect_logger.removeHandler(handler)
    assert not [m for m in seen if "do not exist" in m], seen

    with get_client(sync_client=True) as client:  # once the limit exists, the stage holds a slot of it
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        try:
            with gpu_slot(recipe):
                assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
        finally:
            client.delete_global_concurrency_limit_by_name(name)
