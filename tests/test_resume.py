"""Resuming: a run killed at any point continues from its first unfinished stage, to the same data.

- A lake writer SIGKILLed between its parts and its manifest leaves nothing any reader sees, and
  the next attempt replaces what it left (file:// and s3://), fast.
- Registering the same checkpoint again (a resumed run replaying a step) finds its model version
  by tags and reports the promotion decided the first time, fast.
- A run whose last stage lost its manifest redoes only that stage on resume: the same files, the same
  summary and table, no second model version or MLflow run, fast.
- ``flywheel run`` killed with SIGKILL during Grow and again during training, then re-run with the
  same ``--run-name``, ends with exactly the datasets of an uninterrupted run with the same seed,
  no orphaned stage and one model version per (run, iteration, step) (slow: three small runs).

Run: ``.venv/bin/python -m pytest tests/test_resume.py -q`` (add ``-m 'not slow'`` for the fast ones).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from alignment.recipe import load_recipe
from flows.inspect import inspect_uri
from tasks.context import RunRef
from tasks.lake import MANIFEST, Lake
from tests.flywheel_helpers import (
    FAST, RESOURCE_FIGURES, client_for, file_digests, flywheel, manifest_path, measured, partial_stages, run_dir, stage_dir, summary_of,
    versions_of,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
# Small enough for 2 busy cores; grow.batch_size=4 stretches Grow (same samples: they are seeded
# per prompt and index) so a kill lands inside it; patience keeps both iterations.
SMALL = [
    "task.n_prompts=100", "task.n_eval=50", "task.n_labelled=100", "warm_start.epochs=4", "grow_steps=2",
    "grow.samples_per_prompt=4", "grow.batch_size=4", "improve.epochs=2", "eval.patience=5",
]
DATASETS = ("samples", "scored", "filtered/step=1", "eval/step=1")


# -- helpers -------------------------------------------------------------------------------------
def _frame(n: int, tag: str) -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": list(range(n)), "completion": [f"{tag}{i}" for i in range(n)], "reward": [0.5] * n})


_WRITER = r"""
import sys, time
import polars as pl
from tasks.lake import Lake
lake, stage, moved = Lake(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lake.clear(stage)
parts = [lake.write_part(stage, shard, pl.DataFrame({"prompt_id": [shard], "completion": ["killed"], "reward": [0.0]}))
         for shard in range(3)]
staging = lake.address(stage).staging_uri
for f in parts[:moved]:  # Lake.commit's first step, part by part: the window docs/lake.md names
    lake.store.move(f"{staging}/{f['name']}", f"{stage}/{f['name']}")
print("parts written", flush=True)
time.sleep(600)  # killed here: before the manifest
"""


def _kill_writer_mid_stage(lake_uri: str, stage: str, moved: int = 0) -> None:
    """Run a real writer process and SIGKILL it after its parts (and ``moved`` of their moves), before its manifest."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, lake_uri, stage, str(moved)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "parts written"  # bounded: the child exits on error
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _plain_scan(lake: Lake, table: str) -> pl.DataFrame:
    """What any engine sees pointed at a table's prefix: pyarrow's dataset reader, hive partitioning, no manifests."""
    options = lake.store.storage_options()
    if options is None:
        path, filesystem = lake.uri.removeprefix("file://") + f"/{table}", None
    else:
        path = f"{lake.uri}/{table}".removeprefix("s3://")
        filesystem = pafs.S3FileSystem(
            access_key=options["aws_access_key_id"], secret_key=options["aws_secret_access_key"],
            endpoint_override=options["aws_endpoint_url"], region=options["aws_region"],
        )
    try:
        return pl.from_arrow(ds.dataset(path, filesystem=filesystem, format="parquet", partitioning="hive").to_table())
    except FileNotFoundError:
        return pl.DataFrame()


def _check_killed_stage_invisible_then_replaced(lake: Lake, run: str) -> None:
    committed = lake.stage_uri(run, 1, "scored")
    lake.write_stage(committed, [_frame(4, "ok")])
    stage = lake.stage_uri(run, 1, "filtered", 1)
    staging = lake.address(stage).staging_uri

    # Killed while its parts were staged (the whole time a stage computes): the table shows nothing of it.
    _kill_writer_mid_stage(lake.uri, stage)
    assert len(lake.store.list(staging)) == 3 and lake.store.list(stage) == []  # the parts are staged...
    assert not lake.is_done(stage)  # ...but the stage is not committed
    assert _plain_scan(lake, "filtered").height == 0
    assert _plain_scan(lake, "scored").height == 4  # the committed stage beside it reads as ever
    report = inspect_uri(lake.run_uri(run))
    assert [s["stage"] for s in report["stages"]] == ["scored"]
    with pytest.raises(FileNotFoundError):
        lake.read(stage)

    # Killed inside the commit, after the first of three moves: a plain scan sees exactly that part
    # (flywheel's readers, which go by manifests, see nothing), as docs/lake.md says.
    _kill_writer_mid_stage(lake.uri, stage, moved=1)
    assert lake.store.list(stage) == [f"{stage}/part-00000.parquet"] and not lake.is_done(stage)
    assert _plain_scan(lake, "filtered")["completion"].to_list() == ["killed"]
    assert [s["stage"] for s in inspect_uri(lake.run_uri(run))["stages"]] == ["scored"]

    lake.write_stage(stage, [_frame(2, "new")])  # the re-run makes it whole
    assert lake.store.list(stage) == [f"{stage}/part-00000.parquet"] and lake.store.list(staging) == []
    assert lake.read(stage).equals(_frame(2, "new"))
    scan = _plain_scan(lake, "filtered")
    assert scan.drop("run", "iteration", "step").equals(_frame(2, "new"))
    assert scan.select("run", "iteration", "step").unique().rows() == [(run, 1, 1)]
    assert lake.read(committed).equals(_frame(4, "ok"))


def test_killed_writer_leaves_nothing_visible_local(tmp_path: Path) -> None:
    _check_killed_stage_invisible_then_replaced(Lake(str(tmp_path / "lake")), "run-1")


def test_killed_writer_leaves_nothing_visible_s3(s3_lake: str) -> None:
    _check_killed_stage_invisible_then_replaced(Lake(s3_lake), "run-1")


# -- MLflow registration replayed -----------------------------------------------------------------
def _ref(workdir: Path, run: str) -> RunRef:
    recipe = load_recipe(RECIPE, [f"lake={workdir / 'lake'}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                                  "mlflow.experiment=resume-test"])
    return RunRef(run=run, lake=Lake(recipe.lake).uri, recipe=recipe, cache_dir=str(workdir / "cache"))


def test_replayed_registration_reuses_the_version_and_its_decision(workdir: Path, tiny_model_dir) -> None:
    from mlflow import MlflowClient

    from tasks.tracking.registry import CHAMPION, PROMOTED_TAG, register, start_tracking

    ref = _ref(workdir, "replay")
    lake = ref.open_lake()
    ref = ref.model_copy(update={"mlflow_run_id": start_tracking.fn(ref)})
    data, evals = ref.stage_uri(0, "labelled"), ref.stage_uri(0, "eval", 0)
    lake.write_stage(data, [_frame(3, "d")])
    lake.write_stage(evals, [_frame(3, "e")])
    ckpt = [lake.put_dir(tiny_model_dir, ref.stage_uri(g, "checkpoint", 1)).uri for g in (0, 1)]

    first = register.fn(ref, ckpt[0], {"eval_reward": 0.2, "eval_accuracy": 0.2}, 0, 1, [data, evals])
    second = register.fn(ref, ckpt[1], {"eval_reward": 0.5, "eval_accuracy": 0.5}, 1, 1, [data, evals],
                         parent_version=first.model_version)
    assert (first.promoted, second.promoted) == (True, True)

    # A resumed run replays both steps: same versions, same decisions, the champion stays put.
    assert register.fn(ref, ckpt[0], {"eval_reward": 0.2, "eval_accuracy": 0.2}, 0, 1, [data, evals]) == first
    client = MlflowClient()
    name = ref.recipe.model_name
    # Killed after the version was created but before the champion decision: the replay decides.
    client.delete_model_version_tag(name, second.model_version, PROMOTED_TAG)
    client.delete_registered_model_alias(name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, first.model_version)
    replay = register.fn(ref, ckpt[1], {"eval_reward": 0.5, "eval_accuracy": 0.5}, 1, 1, [data, evals],
                         parent_version=first.model_version)
    assert replay == second
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == second.model_version

    # Killed after the alias moved but before the decision was recorded: still promoted, nothing moves.
    client.delete_model_version_tag(name, second.model_version, PROMOTED_TAG)
    assert register.fn(ref, ckpt[1], {"eval_reward": 0.5, "eval_accuracy": 0.5}, 1, 1, [data, evals],
                       parent_version=first.model_version) == second

    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(str(v.version) for v in versions) == sorted([first.model_version, second.model_version])
    tags = client.get_model_version(name, second.model_version).tags
    assert tags["flywheel.parent_version"] == first.model_version
    assert tags[PROMOTED_TAG] == "true"
    assert tags["flywheel.checkpoint"] == ckpt[1]
    assert tags["flywheel.checkpoint_sha256"] == lake.manifest(ckpt[1]).sha256
    assert json.loads(tags["flywheel.datasets"]) == [
        {"uri": u, "table": table, "partition": partition, "sha256": lake.manifest(u).sha256, "rows": 3}
        for u, table, partition in ((data, "labelled", "run=replay/iteration=0"), (evals, "eval", "run=replay/iteration=0/step=0"))
    ]


# -- the real command, killed and resumed -----------------------------------------------------------
class Launch:
    """One ``flywheel run`` in its own process group (so SIGKILL takes its Prefect server too)."""

    def __init__(self, cwd: Path, run: str, tag: str):
        self.cwd, self.run = cwd, run
        self.err = cwd / f"{run}-{tag}.stderr"
        self.out = cwd / f"{run}-{tag}.stdout"
        cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", run,
               *[a for s in SMALL for a in ("--set", s)]]
        env = {**os.environ, "FLYWHEEL_PROGRESS_SECONDS": "0.01"}  # Grow and training say they are under way
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env, start_new_session=True)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"flywheel run ended (rc={self.proc.returncode}) before {what}:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout:.0f} s")
            time.sleep(0.02)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def finish(self, timeout: float = 1500) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        assert self.proc.returncode == 0, self.stderr()[-4000:]


def _manifest_exists(cwd: Path, run: str, rel: str) -> bool:
    return manifest_path(cwd / "lake", run, rel).exists()


def _uncommitted_models(cwd: Path, run: str) -> list[str]:
    """Model folders with files but no manifest."""
    root = cwd / "lake" / "models" / run
    found = []
    for folder in sorted({p.parent for p in root.rglob("*") if p.is_file()}):
        covered = [d for d in (folder, *folder.parents) if d != root and root in d.parents and (d / MANIFEST).exists()]
        if folder != root and not covered:  # a checkpoint's sub-folders are covered by its manifest
            found.append(folder.relative_to(root).as_posix())
    return found


def _check_commits(cwd: Path, run: str) -> None:
    """Every manifest lists files that exist with their size; no table part and no model folder outside a commit;
    nothing left staged."""
    lake = Lake(str(cwd / "lake"))
    for a in lake.committed(run):
        for f in lake.manifest(a.uri).files:
            assert lake.store.size(f"{a.uri}/{f['name']}") == f["bytes"], f"{a.uri}/{f['name']}"
    for manifest in (cwd / "lake" / "models" / run).rglob(MANIFEST):
        for f in json.loads(manifest.read_text())["files"]:
            assert (manifest.parent / f["name"]).stat().st_size == f["bytes"], f"{manifest.parent}/{f['name']}"
    assert _uncommitted_models(cwd, run) == []
    assert partial_stages(cwd / "lake") == []
    assert [p for p in (run_dir(cwd / "lake", run) / "staging").rglob("*") if p.is_file()] == []


def _datasets(cwd: Path, run: str) -> dict[str, pl.DataFrame]:
    lake = Lake(str(cwd / "lake"))
    out = {}
    for g in (1, 2):
        for name in DATASETS:
            stage, _, step = name.partition("/step=")
            frame = lake.read(lake.stage_uri(run, g, stage, int(step) if step else None))
            keys = [c for c in ("prompt_id", "sample_idx") if c in frame.columns]
            out[f"iteration={g}/{name}"] = frame.sort(keys)
    return out


def _versions_per_step(cwd: Path, run: str) -> dict[tuple[str, str], int]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{cwd / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the registry an earlier test left set
    counts: dict[tuple[str, str], int] = {}
    for v in client.search_model_versions("name = 'arithmetic-rest'"):
        assert v.tags["flywheel.run"] == run
        key = (v.tags["flywheel.iteration"], v.tags["flywheel.step"])
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- a run whose last stage was left unfinished ----------------------------------------------------------------------------------
def test_resume_redoes_only_the_unfinished_stage(workdir, capsys):
    assert flywheel(RECIPE, *FAST, run="resume") == 0
    first = capsys.readouterr().out
    summary = summary_of(workdir, "resume")
    versions = [(str(v.version), v.run_id) for v in versions_of(workdir)]
    client = client_for(workdir)
    experiment = client.get_experiment_by_name("flywheel").experiment_id
    runs = sorted(r.info.run_id for r in client.search_runs([experiment]))

    last = summary["iterations"][-1]
    rel = f"iteration={last['iteration']}/eval/step={last['step']}"
    stage, manifest = stage_dir(workdir / "lake", "resume", rel), manifest_path(workdir / "lake", "resume", rel)
    old_manifest = json.loads(manifest.read_text())
    manifest.unlink()
    before = file_digests(workdir / "lake")

    assert flywheel(RECIPE, *FAST, run="resume") == 0
    second = capsys.readouterr().out
    after = file_digests(workdir / "lake")

    # The run's lease (who writes it, until when) is rewritten by every attempt; it is not data.
    redone = {k for k in set(before) | set(after) if before.get(k) != after.get(k) and not k.endswith("/lease.json")}
    lake = workdir / "lake"
    assert redone == {
        str(manifest.relative_to(lake)), str((stage / "part-00000.parquet").relative_to(lake)), "runs/resume/summary.json"
    }, sorted(redone)
    new_manifest = json.loads(manifest.read_text())
    assert [f["sha256"] for f in new_manifest["files"]] == [f["sha256"] for f in old_manifest["files"]]
    assert new_manifest["metrics"] == old_manifest["metrics"]
    assert measured(summary_of(workdir, "resume")) == measured(summary)
    assert [(str(v.version), v.run_id) for v in versions_of(workdir)] == versions  # no duplicate model versions
    assert sorted(r.info.run_id for r in client.search_runs([experiment])) == runs  # nor runs
    table = lambda text: [line for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]  # noqa: E731
    assert table(second) == table(first)


@pytest.mark.slow
def test_run_killed_during_grow_and_training_resumes_to_the_same_data(tmp_path: Path) -> None:
    resumed_dir, reference_dir = tmp_path / "resumed", tmp_path / "reference"
    resumed_dir.mkdir()
    reference_dir.mkdir()
    reference = Launch(reference_dir, "uninterrupted", "only")  # alongside, in its own folder and MLflow

    # 1. Killed during Grow: after the warm start's summary, once sampling has begun (or a part is written).
    first = Launch(resumed_dir, "resumed", "grow")
    summary = run_dir(resumed_dir / "lake", "resumed") / "summary.json"
    first.wait_for("the warm start", summary.exists)
    staged = run_dir(resumed_dir / "lake", "resumed") / "staging" / "samples" / "iteration=1"
    # Mid-sampling: a progress line ("grow-shard · 8 of 400 samples, ...") comes only before the last batch.
    first.wait_for("Grow", lambda: re.search(r"^grow-shard · \d+ of \d+ samples", first.stdout(), re.M) or any(staged.glob("part-*")))
    first.kill()
    assert not _manifest_exists(resumed_dir, "resumed", "iteration=1/samples")
    assert not stage_dir(resumed_dir / "lake", "resumed", "iteration=1/samples").exists()  # nothing in the table
    assert not stage_dir(resumed_dir / "lake", "resumed", "iteration=1/scored").exists()
    assert "samples" not in {s["stage"] for s in inspect_uri(str(run_dir(resumed_dir / "lake", "resumed")))["stages"]}

    # 2. Killed during the first Improve step's training (its scratch checkpoint folder exists).
    second = Launch(resumed_dir, "resumed", "train")
    cache = resumed_dir / ".flywheel" / "cache"
    second.wait_for(
        "Improve training",
        lambda: _manifest_exists(resumed_dir, "resumed", "iteration=1/filtered/step=1") and any(cache.glob("tmp*")),
    )
    second.kill()
    assert not _manifest_exists(resumed_dir, "resumed", "iteration=1/checkpoint/step=1")
    assert _versions_per_step(resumed_dir, "resumed") == {("0", "0"): 1}

    # 3. The same --run-name again, to the end.
    third = Launch(resumed_dir, "resumed", "finish")
    third.finish()
    reference.finish()

    resumed, uninterrupted = _datasets(resumed_dir, "resumed"), _datasets(reference_dir, "uninterrupted")
    assert resumed.keys() == uninterrupted.keys()
    for name, frame in resumed.items():
        assert frame.height > 0, name
        assert frame.equals(uninterrupted[name]), name
        if "policy_version" in frame.columns:
            assert not frame["policy_version"].str.contains("resumed").any()

    _check_commits(resumed_dir, "resumed")
    _check_commits(reference_dir, "uninterrupted")
    steps = {("0", "0"): 1, ("1", "1"): 1, ("2", "1"): 1}
    assert _versions_per_step(resumed_dir, "resumed") == steps
    assert _versions_per_step(reference_dir, "uninterrupted") == steps

    def comparable(workdir: Path, run: str) -> list[dict]:
        """What the run measured and decided; how many seconds each stage took differs by nature."""
        doc = json.loads((run_dir(workdir / "lake", run) / "summary.json").read_text())
        fast = RESOURCE_FIGURES
        rows = [doc["baseline"], *doc["iterations"], doc["champion"]]
        return [{k: v for k, v in row.items() if not k.startswith(fast)} for row in rows] + [doc["stopped"]]

    assert comparable(resumed_dir, "resumed") == comparable(reference_dir, "uninterrupted")
