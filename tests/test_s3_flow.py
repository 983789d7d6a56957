"""The flywheel with its lake and its MLflow artifacts on S3 (a real SeaweedFS on loopback).

- fast: ``publish_iteration`` on an S3 lake: Prefect artifacts read back through the Prefect
  client, both plots on the parent MLflow run, MLflow artifacts (plots and a registered model) in
  the bucket through the recipe's endpoint alone, lineage tags, the champion loads back;
  ``flywheel inspect s3://... --json``.
- slow: the demo recipe run by ``flywheel run`` (small sizes, two Grow shards) with
  ``lake=s3://...``; read back with pyarrow (S3FileSystem + dataset, hive partitions) and polars;
  its artifacts, lineage and plots; no credential anywhere it wrote.

Run: ``.venv/bin/python -m pytest tests/test_s3_flow.py -q`` (skipped without the ``weed`` binary).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from alignment.recipe import load_recipe
from infra.seaweed import SeaweedServer
from tasks.context import RunRef
from tasks.lake import MANIFEST, Lake
from tasks.lake import S3Store, split_uri
from tests.s3_fixtures import _FOREIGN_AWS_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
SMALL = [
    "task.n_prompts=100", "task.n_eval=50", "task.n_labelled=100", "warm_start.epochs=4", "grow_steps=2",
    "grow.samples_per_prompt=4", "grow.shards=2", "improve.epochs=2", "eval.patience=5",
]
STAGES = ("samples", "scored", "filtered/step=1", "eval/step=1")


def _without_endpoint(env: dict[str, str]) -> dict[str, str]:
    """The environment minus every S3 endpoint setting: the recipe's ``s3.endpoint_url`` must be enough."""
    return {k: v for k, v in env.items() if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")}


def _artifacts(prefix: str) -> dict[str, object]:
    """The latest Prefect artifact of every key starting with ``prefix``, through the Prefect client."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=prefix)))
    latest: dict[str, object] = {}
    for a in sorted(found, key=lambda a: a.created):
        latest[a.key] = a
    return latest


def _mlflow_texts(tracking_uri: str) -> list[str]:
    """Every param, tag and metric name MLflow holds: runs, registered models and their versions."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    texts = []
    for exp in client.search_experiments():
        texts.append(exp.artifact_location)
        for run in client.search_runs([exp.experiment_id]):
            texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
            texts += list(run.data.metrics)
    for model in client.search_registered_models():
        texts += [f"{k}={v}" for k, v in model.tags.items()]
        for v in client.search_model_versions(f"name = '{model.name}'"):
            texts += [f"{k}={t}" for k, t in v.tags.items()] + [v.source or ""]
    return texts


def _bucket_bytes(store: S3Store, bucket: str) -> bytes:
    return b"\n".join(store.get(uri) for uri in store.list(f"s3://{bucket}"))


def _assert_no_credentials(server: SeaweedServer, *texts: str | bytes) -> None:
    for secret in (server.secret_key, server.access_key):
        for text in texts:
            blob = text if isinstance(text, bytes) else text.encode()
            assert secret.encode() not in blob, "a credential leaked"


# -- fast: one iteration's artifacts and MLflow on S3, in process -------------------------------------
def _scored() -> pl.DataFrame:
    return pl.DataFrame({
        "prompt_id": [0, 0, 1, 1, 2], "prompt": ["1+1=", "1+1=", "2+2=", "2+2=", "3+1="],
        "reference": ["2", "2", "4", "4", "4"], "completion": ["2", "3", "4", "5|x", "4"],
        "sample_idx": pl.Series([0, 1, 0, 1, -1], dtype=pl.Int32), "policy_version": ["iteration=0/checkpoint/step=0"] * 4 + ["labelled"],
        "reward": [1.0, 0.0, 1.0, 0.0, 1.0],
    })


def test_iteration_artifacts_plots_and_models_on_s3(
    s3_lake: str, s3_server: SeaweedServer, workdir: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir
) -> None:
    import mlflow
    from mlflow import MlflowClient
    from prefect import flow

    from tasks.report.artifacts import HELDOUT_PLOT, REWARD_PLOT, artifact_key, publish_iteration
    from tasks.tracking.registry import register, start_tracking

    bucket, _ = split_uri(s3_lake)
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):  # (set then deleted: restored after the test)
        monkeypatch.setenv(name, "http://127.0.0.1:9")
        monkeypatch.delenv(name)
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    recipe = load_recipe(RECIPE, [
        f"lake={s3_lake}", f"s3.endpoint_url={s3_server.endpoint_url}", f"mlflow.tracking_uri={tracking}",
        f"mlflow.artifact_location=s3://{bucket}/mlflow", "mlflow.experiment=artifacts-on-s3",
    ])
    run = f"Run_{secrets.token_hex(3)}"  # upper case and underscore: the artifact keys must be made lowercase-dash
    ref = RunRef(run=run, lake=s3_lake, recipe=recipe, cache_dir=str(workdir / "cache"))
    ref = ref.model_copy(update={"mlflow_run_id": start_tracking.fn(ref)})
    lake = ref.open_lake()
    scored, kept, evals = ref.stage_uri(1, "scored"), ref.stage_uri(1, "filtered", 1), ref.stage_uri(1, "eval", 1)
    lake.write_stage(scored, [_scored()])
    lake.write_stage(kept, [_scored().filter(pl.col("reward") > 0).with_columns(threshold=pl.lit(0.5))], parents=[scored])
    lake.write_stage(evals, [pl.DataFrame({"prompt_id": [9, 10], "completion": ["1", "2"], "reward": [0.0, 1.0]})])
    ckpt = lake.put_dir(tiny_model_dir, ref.stage_uri(1, "checkpoint", 1)).uri
    reg = register.fn(ref, ckpt, {"eval_reward": 0.5, "eval_accuracy": 0.5}, 1, 1, [kept, evals], parent_version="7")
    lake.put_json(f"{lake.run_uri(run)}/summary.json", {
        "baseline": {"eval_reward": 0.25, "eval_accuracy": 0.25, "model_version": "7"},
        "iterations": [{"iteration": 1, "step": 1, "eval_reward": 0.5, "eval_accuracy": 0.5}],
    })

    @flow(name="publish-test")
    def publish() -> dict[str, str]:
        return publish_iteration(ref, 1, scored, kept)

    keys = publish()
    prefix = artifact_key(run, 1, "")
    assert keys == {w: f"{prefix}-{w}" for w in ("rewards", "lake", "samples")} and prefix == f"{run.lower().replace('_', '-')}-iteration-1"
    found = _artifacts(prefix)
    assert set(found) == set(keys.values())
    table = json.loads(found[keys["rewards"]].data)
    by_stage = {row["stage"]: row for row in table}
    assert by_stage["scored"]["rows"] == 5 and by_stage["scored"]["mean"] == pytest.approx(0.6)
    assert by_stage["scored (policy samples)"]["rows"] == 4 and by_stage["filtered/step=1"]["rows"] == 3
    assert by_stage["eval/step=1"]["mean"] == pytest.approx(0.5)
    assert scored in found[keys["lake"]].data and "filtered/run=" in found[keys["lake"]].description
    markdown = found[keys["samples"]].data
    assert "Selection: 3 rows of `filtered/step=1` (of 5 scored)" in markdown and "Dropped: 2 scored rows" in markdown
    assert "5\\|x" in markdown  # a pipe inside a cell does not break the table

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    assert {a.path for a in client.list_artifacts(ref.mlflow_run_id, "plots")} == {REWARD_PLOT, HELDOUT_PLOT}
    objects = S3Store(endpoint_url=s3_server.endpoint_url).list(f"s3://{bucket}/mlflow")
    assert any(o.endswith(REWARD_PLOT) for o in objects) and any(o.endswith(HELDOUT_PLOT) for o in objects)
    assert any(o.endswith("model.safetensors") for o in objects) and any(o.endswith("MLmodel") for o in objects)

    version = client.get_model_version(recipe.model_name, reg.model_version)
    assert json.loads(version.tags["flywheel.datasets"]) == [
        {"uri": u, "table": lake.address(u).stage, "partition": lake.address(u).partition,
         "sha256": lake.manifest(u).sha256, "rows": lake.manifest(u).rows} for u in (kept, evals)
    ]
    assert version.tags["flywheel.parent_version"] == "7"
    assert version.tags["flywheel.checkpoint_sha256"] == lake.manifest(ckpt).sha256
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    model = mlflow.pyfunc.load_model(f"models:/{recipe.model_name}@champion")
    assert len(model.predict(["1+1="], params={"max_new_tokens": 2})) == 1

    manifests = [lake.store.get(u) for u in lake.store.list(lake.run_uri(run)) if u.endswith((MANIFEST, ".json"))]
    _assert_no_credentials(s3_server, *manifests, *_mlflow_texts(tracking),
                           *(f"{a.data} {a.description}" for a in found.values()))


def test_inspect_an_s3_run_as_json(s3_lake: str, s3_server: SeaweedServer) -> None:
    lake = Lake(s3_lake)
    scored, kept = lake.stage_uri("r", 1, "scored"), lake.stage_uri("r", 1, "filtered", 1)
    lake.write_stage(scored, [_scored()])
    lake.write_stage(kept, [_scored().filter(pl.col("reward") > 0)], parents=[scored])
    lake.store.put(f"{lake.stage_uri('r', 2, 'samples')}/part-00000.parquet", b"a killed attempt's part")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", lake.run_uri("r"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {s["stage"]: s["rows"] for s in report["stages"]} == {"scored": 5, "filtered/step=1": 3}  # not samples
    assert report["kept_by_step"][0]["kept_fraction"] == pytest.approx(0.6)
    _assert_no_credentials(s3_server, proc.stdout, proc.stderr)


def test_sql_and_runs_over_an_s3_lake_from_the_cli(s3_lake: str, s3_server: SeaweedServer) -> None:
    """`flywheel sql` and `flywheel runs` on an S3 lake, as a user runs them: committed partitions only."""
    lake = Lake(s3_lake)
    for run in ("a", "b"):
        lake.write_stage(lake.stage_uri(run, 1, "scored"), [_scored()])
    lake.store.put(f"{lake.stage_uri('a', 2, 'scored')}/part-00000.parquet", b"a killed attempt's part")
    lake.put_json(f"{lake.run_uri('a')}/summary.json", {"run": "a", "iterations": [{"iteration": 1}], "stopped": "done"})
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "sql", "SELECT run, iteration, count(*) AS n, avg(reward) AS r "
                           "FROM scored GROUP BY ALL ORDER BY ALL", "--lake", s3_lake, "--format", "json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = _scored()["reward"].mean()
    assert [(r["run"], r["iteration"], r["n"]) for r in json.loads(proc.stdout)] == [("a", 1, 5), ("b", 1, 5)]
    assert all(r["r"] == pytest.approx(expected) for r in json.loads(proc.stdout))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "runs", "--lake", s3_lake, "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [(r["run"], r["status"]) for r in json.loads(proc.stdout)] == [("a", "finished"), ("b", "unfinished")]
    _assert_no_credentials(s3_server, proc.stdout, proc.stderr)


# -- slow: the real command on an S3 lake ------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_run(s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory):
    """One small run of the demo recipe with its lake and its MLflow artifacts in a SeaweedFS bucket."""
    bucket = f"flow-{secrets.token_hex(5)}"
    s3_server.create_bucket(bucket)
    workdir = tmp_path_factory.mktemp("s3-run")
    run, lake = "s3-demo", f"s3://{bucket}/lake"
    env = _without_endpoint({k: v for k, v in os.environ.items() if k not in _FOREIGN_AWS_SETTINGS} | s3_server.aws_env())
    cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", run,
           *[a for s in SMALL for a in ("--set", s)],
           "--set", f"lake={lake}", "--set", f"s3.endpoint_url={s3_server.endpoint_url}",
           "--set", f"mlflow.artifact_location=s3://{bucket}/mlflow"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.aws_env().items():
            mp.setenv(name, value)
        yield SimpleNamespace(bucket=bucket, workdir=workdir, run=run, lake=Lake(lake), proc=proc,
                              tracking=f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}")


@pytest.mark.slow
def test_s3_run_reads_back_with_pyarrow_and_polars(s3_run, s3_server: SeaweedServer) -> None:
    lake, run = s3_run.lake, s3_run.run
    assert re.search(r"^summary:\s+s3://", s3_run.proc.stdout, re.M)
    filesystem = pafs.S3FileSystem(access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                                   endpoint_override=s3_server.endpoint_url, region="us-east-1")
    for stage in STAGES:
        name, _, step = stage.partition("/step=")
        uris = [lake.stage_uri(run, g, name, int(step) if step else None) for g in (1, 2)]
        # The table's prefix, as an engine declares it; the run is a partition to filter on.
        table = ds.dataset(f"{lake.uri}/{name}"[len("s3://"):], filesystem=filesystem, format="parquet", partitioning="hive")
        mine = (ds.field("run") == run) & ds.field("iteration").isin([1, 2])  # partitions prune: eval also holds iteration 0
        got = pl.from_arrow(table.to_table(filter=mine)).drop("run")
        keys_in_path = {"iteration": None, **({"step": int(step)} if step else {})}  # hive partitions: path only
        expected = pl.concat([
            lake.read(u).with_columns(**{k: pl.lit(v if k == "step" else g, pl.Int32) for k, v in keys_in_path.items()})
            for g, u in zip((1, 2), uris)
        ])
        keys = [c for c in ("iteration", "prompt_id", "sample_idx") if c in got.columns]
        assert got.height == sum(lake.manifest(u).rows for u in uris) > 0
        assert got.sort(keys).equals(expected.select(got.columns).sort(keys))
        # A partition folder holds its parts and nothing else.
        assert all(u.endswith(".parquet") for u in lake.store.list(f"{lake.uri}/{name}"))
        folder = ds.dataset(uris[0][len("s3://"):], filesystem=filesystem, format="parquet")
        assert folder.count_rows() == lake.manifest(uris[0]).rows
    scored = (
        pl.scan_parquet(f"{lake.uri}/scored/**/*.parquet", storage_options=lake.store.storage_options(), hive_partitioning=True)
        .filter(pl.col("run") == run)
        .collect()
    )
    assert scored.height == sum(lake.manifest(lake.stage_uri(run, g, "scored")).rows for g in (1, 2))
    assert scored.filter(pl.col("iteration") == 1).drop("run", "iteration").sort("prompt_id", "sample_idx").equals(
        lake.read(lake.stage_uri(run, 1, "scored")).sort("prompt_id", "sample_idx"))


@pytest.mark.slow
def test_s3_run_inspects_as_json(s3_run) -> None:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", s3_run.lake.run_uri(s3_run.run), "--json"],
                          cwd=s3_run.workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    stages = {(s.get("iteration"), s["stage"]) for s in report["stages"]}
    assert {(g, s) for g in (1, 2) for s in STAGES} <= stages
    assert report["summary"]["run"] == s3_run.run and len(report["kept_by_step"]) == 2


@pytest.mark.slow
def test_s3_run_artifacts_lineage_and_plots(s3_run) -> None:
    from mlflow import MlflowClient

    from tasks.report.artifacts import HELDOUT_PLOT, REWARD_PLOT, artifact_key
    from tasks.report.summary import summary_key

    lake, run = s3_run.lake, s3_run.run
    found = _artifacts(run)  # the run name is already lowercase-dash
    # One summary of the run, and rewards, lake and samples of each iteration.
    assert set(found) == {artifact_key(run, g, w) for g in (1, 2) for w in ("rewards", "lake", "samples")} | {summary_key(run)}
    assert found[artifact_key(run, 2, "lake")].data.count(lake.stage_uri(run, 2, "scored")) == 2  # text and target

    client = MlflowClient(tracking_uri=s3_run.tracking, registry_uri=s3_run.tracking)
    versions = {(v.tags["flywheel.iteration"], v.tags["flywheel.step"]): v
                for v in client.search_model_versions("name = 'arithmetic-rest'")}
    assert set(versions) == {("0", "0"), ("1", "1"), ("2", "1")}
    summary = lake.get_json(f"{lake.run_uri(run)}/summary.json")
    adopted = str(versions[("0", "0")].version)
    for g in (1, 2):
        v = versions[(str(g), "1")]
        assert v.tags["flywheel.parent_version"] == adopted
        lineage = json.loads(v.tags["flywheel.datasets"])
        assert [d["uri"] for d in lineage] == [lake.stage_uri(run, g, "filtered", 1), lake.stage_uri(run, g, "eval", 1)]
        assert all(d["sha256"] == lake.manifest(d["uri"]).sha256 for d in lineage)
        assert v.tags["flywheel.checkpoint_sha256"] == lake.manifest(v.tags["flywheel.checkpoint"]).sha256
        row = summary["iterations"][g - 1]
        if row["eval_reward"] > max([summary["baseline"]["eval_reward"]] + [r["eval_reward"] for r in summary["iterations"][: g - 1]]):
            adopted = str(v.version)  # ReST continues from a step only when it beat the best so far
    parent = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id],
                                filter_string=f"tags.`flywheel.run` = '{run}' and tags.`flywheel.kind` = 'parent'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {REWARD_PLOT, HELDOUT_PLOT}
    objects = S3Store().list(f"s3://{s3_run.bucket}/mlflow")
    assert any(o.endswith(REWARD_PLOT) for o in objects) and any(o.endswith("model.safetensors") for o in objects)


@pytest.mark.slow
def test_s3_run_writes_no_credentials_anywhere(s3_run, s3_server: SeaweedServer) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[s3_run.run])))
        assert len(flow_runs) == 1
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_runs[0].id])))
    assert len(logs) > 10
    artifacts = _artifacts(s3_run.run)
    assert artifacts
    prefect_home = Path(os.environ["PREFECT_HOME"])  # the Prefect database: runs, parameters, logs, artifacts
    written = [p.read_bytes() for root in (s3_run.workdir, prefect_home) for p in root.rglob("*") if p.is_file()]
    _assert_no_credentials(
        s3_server, s3_run.proc.stdout, s3_run.proc.stderr, *(log.message for log in logs),
        *(f"{a.data} {a.description}" for a in artifacts.values()), *_mlflow_texts(s3_run.tracking),
        _bucket_bytes(S3Store(), s3_run.bucket), *written, repr(flow_runs[0].parameters),
    )
