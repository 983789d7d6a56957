"""What the CLI end-to-end tests share: the demo recipe and its fast sizes, running ``flywheel run``
in this process, and reading back what a run left in the lake and in MLflow.

Used by ``test_rest_flow.py``, ``test_bad_input.py`` and ``test_user_task.py``. Each of them imports
``one_torch_thread`` so the autouse fixture applies to its tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
MANIFEST = "_manifest.json"
MODEL = "arithmetic-rest"  # the demo recipe's name: its registered model

# Small but not trivial: the warm start gets some sums right (about 1 in 8 held out), so Grow/Improve
# has samples to keep and to drop. About 15 s of compute on one core.
FAST = [
    "task.n_labelled=100", "task.n_prompts=60", "task.n_eval=40", "warm_start.epochs=25",
    "grow_steps=2", "grow.samples_per_prompt=4", "improve.epochs=2", "eval.patience=2",
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On two cores shared with other jobs a second intra-op thread mostly waits: training gets ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def flywheel(recipe: Path | str, *sets: str, run: str) -> int:
    """``flywheel run RECIPE --run-name RUN --set ...`` in this process; returns the exit code."""
    argv = ["run", str(recipe), "--run-name", run]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"


def client_for(workdir: Path):
    from mlflow import MlflowClient

    uri = tracking_uri(workdir)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions_of(workdir: Path, name: str = MODEL) -> list:
    if not (workdir / "mlflow" / "mlflow.db").exists():
        return []
    return sorted(client_for(workdir).search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def summary_of(workdir: Path, run: str) -> dict:
    return json.loads((workdir / "lake" / run / "summary.json").read_text())


def read_stage(stage_dir: Path) -> pl.DataFrame:
    """The rows of a committed stage, read from the parts its manifest lists, in order."""
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    frames = [pl.read_parquet(stage_dir / f["name"]) for f in manifest["files"]]
    return pl.concat(frames) if frames else pl.DataFrame()


def partial_stages(lake: Path) -> list[str]:
    """Folders under a run that hold files but no manifest: a stage someone could half-see."""
    bad = []
    for run_dir in (p for p in lake.iterdir() if p.is_dir()) if lake.exists() else []:
        for d in (p for p in run_dir.rglob("*") if p.is_dir()):
            files = [p.name for p in d.iterdir() if p.is_file()]
            if files and MANIFEST not in files:
                bad.append(str(d.relative_to(lake)))
            bad += [str(d / f) for f in files if f.startswith(".tmp-")]
    return bad
