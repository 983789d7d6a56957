"""What the CLI end-to-end tests share: the demo recipe and its fast sizes, running ``flywheel run``
in this process, and reading back what a run left in the lake and in MLflow.

Used by ``test_rest_flow.py``, ``test_bad_input.py`` and ``test_user_task.py``. Each of them imports
``one_torch_thread`` so the autouse fixture applies to its tests.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import polars as pl
import pytest

from flows.cli import main
from tasks.lake import TABLES, Lake

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


def run_dir(lake_dir: Path, run: str) -> Path:
    """``{lake}/runs/{run}``: the run's summary, identity, lease and manifests."""
    return lake_dir / "runs" / run


def summary_of(workdir: Path, run: str) -> dict:
    return json.loads((run_dir(workdir / "lake", run) / "summary.json").read_text())


_REL = re.compile(r"iteration=(\d+)/([a-z_]+)(?:/step=(\d+))?")


def address(lake_dir: Path, run: str, rel: str):
    """The lake address of a stage named as tests name it, ``iteration=G/STAGE[/step=I]``."""
    g, stage, step = _REL.fullmatch(rel).groups()
    lake = Lake(f"file://{lake_dir}")
    return lake.address_of(lake.stage_uri(run, int(g), stage, int(step) if step else None))


def stage_dir(lake_dir: Path, run: str, rel: str) -> Path:
    """Where a stage's files lie: a table partition, or a model directory under ``models/``."""
    return Path(address(lake_dir, run, rel).uri.removeprefix("file://"))


def manifest_path(lake_dir: Path, run: str, rel: str) -> Path:
    return Path(address(lake_dir, run, rel).manifest_uri.removeprefix("file://"))


def read_stage(lake_dir: Path, run: str, rel: str) -> pl.DataFrame:
    """The rows of a committed stage, read from the parts its manifest lists, in order."""
    manifest = json.loads(manifest_path(lake_dir, run, rel).read_text())
    folder = stage_dir(lake_dir, run, rel)
    frames = [pl.read_parquet(folder / f["name"]) for f in manifest["files"]]
    return pl.concat(frames) if frames else pl.DataFrame()


def partial_stages(lake: Path) -> list[str]:
    """Table partitions holding parts their manifest does not list (a stage someone could half-see), files
    other than Parquet parts under a table, and leftover temporary files anywhere in the lake."""
    bad = []
    handle = Lake(f"file://{lake}")
    for table in TABLES:
        for part in sorted((lake / table).rglob("*")) if (lake / table).exists() else []:
            if part.is_dir():
                continue
            if not part.name.endswith(".parquet") or part.name.startswith((".", "_")):
                bad.append(str(part.relative_to(lake)))
                continue
            where = handle.address(f"file://{part.parent}")
            manifest = Path(where.manifest_uri.removeprefix("file://")) if where else None
            listed = json.loads(manifest.read_text())["files"] if manifest and manifest.exists() else []
            if part.name not in {f["name"] for f in listed}:
                bad.append(str(part.relative_to(lake)))
    bad += [str(p.relative_to(lake)) for p in lake.rglob(".tmp-*")] if lake.exists() else []
    return bad


def file_digests(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# Figures of how fast and in how much memory a run went: they differ between two runs of one recipe.
RESOURCE_FIGURES = ("seconds_", "grow_samples_per_s", "grow_tokens_per_s", "train_peak_memory_mib", "peak_memory_mib_rank")


def measured(summary: dict) -> dict:
    """What a run measured: its summary less where it lives (name, lake, MLflow run, report), how fast it went and
    how much memory its training took (the process's peak, which depends on what else the process holds)."""
    where = ("run", "lake", "run_uri", "mlflow", "report", "iterations", "baseline")
    timing = lambda row: {k: v for k, v in row.items() if not k.startswith(RESOURCE_FIGURES)}  # noqa: E731
    return {**{k: v for k, v in summary.items() if k not in where},
            "iterations": [timing(r) for r in summary["iterations"]], "baseline": timing(summary["baseline"])}
