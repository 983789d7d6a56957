"""ReST end to end through the real CLI (``flows.cli.main``) on the built-in arithmetic task: one run
inspected from every side (summary, lake, manifests, readers, champion, MLflow), determinism, and steps
that do not improve or keep nothing.

Everything is real: flows on the embedded Prefect API, MLflow on SQLite in a temporary directory,
the lake on the local filesystem, the built-in tiny Llama on CPU. Each run is kept small enough for
the default tier on two busy cores; the ``slow`` test repeats the learning check at demo-like size.
Bad input is in ``test_bad_input.py``, a user's own task in ``test_user_task.py``, resuming in
``test_resume.py``; the helpers they share are in ``flywheel_helpers.py``.

Run: ``.venv/bin/python -m pytest tests/test_rest_flow.py -q`` (``-m 'not slow'`` for the fast ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

# Prefect points its console log handler at the sys.stderr of the moment it is imported. Importing
# it here, at collection, binds it to pytest's session-long capture instead of one test's capsys
# stream (closed after that test, after which every Prefect log line would fail and recurse).
from prefect import flow as _prefect_flow  # noqa: F401

from alignment import filters
from tests.flywheel_helpers import (  # one_torch_thread is autouse: one intra-op thread for this module
    FAST, MODEL, RECIPE, RESOURCE_FIGURES, ROOT, client_for, flywheel, manifest_path, measured, one_torch_thread,  # noqa: F401
    partial_stages, read_stage, run_dir, stage_dir, summary_of, tracking_uri, versions_of,
)

# The issue's small recipe (slow tier): big enough that held-out reward visibly rises.
SMALL = [
    "task.n_prompts=200", "task.n_eval=100", "warm_start.epochs=20", "grow_steps=2", "grow.samples_per_prompt=4",
]
SUMMARY_ROW = {"iteration", "step", "tau", "samples", "kept", "eval_reward", "eval_accuracy", "model_version", "promoted"}


# -- helpers -----------------------------------------------------------------------------------
@contextlib.contextmanager
def chdir(path: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        yield


# -- (a) one run, inspected from every side ------------------------------------------------------
class Run:
    def __init__(self, workdir: Path, name: str, rc: int, out: str):
        self.workdir, self.name, self.rc, self.out = workdir, name, rc, out
        self.lake = workdir / "lake"
        self.dir = run_dir(self.lake, name)
        self.summary = summary_of(workdir, name) if rc == 0 else None

    def stage(self, rel: str) -> pl.DataFrame:
        """The rows of the stage ``iteration=G/STAGE[/step=I]`` of this run."""
        return read_stage(self.lake, self.name, rel)

    def path(self, rel: str) -> Path:
        return stage_dir(self.lake, self.name, rel)

    def manifest(self, rel: str) -> dict:
        return json.loads(manifest_path(self.lake, self.name, rel).read_text())


def _run_in(tmp_path_factory, name: str, *sets: str) -> Run:
    workdir = tmp_path_factory.mktemp(name)
    buf = io.StringIO()
    with chdir(workdir), contextlib.redirect_stdout(buf):
        rc = flywheel(RECIPE, *sets, run=name)
    return Run(workdir, name, rc, buf.getvalue())


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> Run:
    run = _run_in(tmp_path_factory, "fast-a", *FAST)
    assert run.rc == 0
    return run


@pytest.fixture(scope="module")
def fast_run_again(tmp_path_factory) -> Run:
    """The same recipe and seed under another run name, in another directory (own lake and MLflow)."""
    run = _run_in(tmp_path_factory, "fast-b", *FAST)
    assert run.rc == 0
    return run


def test_summary_follows_the_design_schema(fast_run):
    s = fast_run.summary
    assert {"run", "algorithm", "lake", "baseline", "iterations", "champion"} <= set(s)
    assert (s["run"], s["algorithm"]) == ("fast-a", "rest")
    assert s["lake"] == "file://" + str(fast_run.lake.resolve())
    assert set(s["baseline"]) >= {"eval_reward", "eval_accuracy", "model_version"}
    assert s["baseline"]["model_version"] == "1"
    assert [(r["iteration"], r["step"]) for r in s["iterations"]] == [(1, 1), (2, 1)]
    for row in s["iterations"]:
        assert SUMMARY_ROW <= set(row), row
        assert isinstance(row["tau"], float) and isinstance(row["samples"], int) and isinstance(row["kept"], int)
        assert 0.0 <= row["eval_reward"] <= 1.0 and 0.0 <= row["eval_accuracy"] <= 1.0
        assert isinstance(row["model_version"], str) and isinstance(row["promoted"], bool)
    assert [r["model_version"] for r in s["iterations"]] == ["2", "3"]
    assert set(s["champion"]) >= {"model_name", "version", "eval_reward"}
    assert s["champion"]["model_name"] == MODEL
    assert s["stopped"] == "completed all Grow steps"
    # The CLI prints the same numbers as a table.
    assert f"{s['baseline']['eval_reward']:.3f}" in fast_run.out
    assert re.search(rf"^summary:\s+{re.escape(s['lake'])}/runs/fast-a/summary.json$", fast_run.out, re.M)


def test_summary_counts_and_thresholds_match_the_lake(fast_run):
    for row in fast_run.summary["iterations"]:
        it = f"iteration={row['iteration']}"
        scored = fast_run.stage(f"{it}/scored")
        kept = fast_run.stage(f"{it}/filtered/step=1")
        assert row["samples"] == scored.height == 60 * 4 + 100  # samples plus the labelled data D
        assert row["kept"] == kept.height
        # tau_1 > V_pi: the mean reward of the policy's own samples (labelled rows excluded).
        own = scored.filter(pl.col("sample_idx") >= 0)["reward"]
        assert row["tau"] == filters.rest_thresholds(own.mean(), scored["reward"].max(), 1)[0]
        assert row["tau"] > own.mean()
        assert kept["reward"].min() >= row["tau"] and (kept["threshold"] == row["tau"]).all()
        # Dropped rows stay in `scored`: "why was this dropped" is a query.
        assert scored.filter(pl.col("reward") < row["tau"]).height > 0
        assert kept.join(scored, on=["prompt_id", "sample_idx"], how="anti").height == 0
        evals = fast_run.stage(f"{it}/eval/step=1")
        assert evals.height == 40
        assert row["eval_reward"] == pytest.approx(evals["reward"].mean())
        assert row["eval_accuracy"] == pytest.approx(evals["correct"].mean())
        # Every sample says how it ended; cut-off samples are never trained on, and the filter counts each drop.
        assert set(scored["finish_reason"]) <= {"stop", "length"}
        assert (kept["finish_reason"] == "stop").all()
        dropped = fast_run.manifest(f"{it}/filtered/step=1")["dropped"]
        finished = scored.filter(pl.col("finish_reason") == "stop")
        assert dropped["truncated"] == scored.height - finished.height
        assert sum(dropped.values()) == scored.height - kept.height


def test_eval_keeps_each_completions_ids_and_log_probs_and_the_kl_is_one_reference_pass_over_them(fast_run):
    from alignment.evaluation import completion_logps
    from alignment.models import load_policy
    from alignment.prompting import formatter_for

    def model(rel: str):
        return load_policy(fast_run.lake / "models" / "fast-a" / rel, device="cpu")

    initial, tokenizer = model("iteration=0/checkpoint/step=0")
    fmt = formatter_for(initial, tokenizer)
    assert fast_run.summary["baseline"]["eval_kl"] == 0.0
    for row in fast_run.summary["iterations"]:
        it = f"iteration={row['iteration']}"
        evals = fast_run.stage(f"{it}/eval/step=1")
        assert evals.schema["token_logps"] == pl.List(pl.Float32)
        assert evals.schema["token_ids"] == evals.schema["prompt_token_ids"] == pl.List(pl.Int32)
        ids = evals["token_ids"].to_list()
        assert [len(t) for t in ids] == evals["token_logps"].list.len().to_list() == evals["num_tokens"].to_list()
        assert [fmt.decode(t).startswith(c) for t, c in zip(ids, evals["completion"], strict=True)] == [True] * evals.height
        # The candidate's log-probs from generation are those of a teacher-forced pass over the same ids ...
        prompt_ids = evals["prompt_token_ids"].to_list()
        assert prompt_ids == [fmt.prompt_ids(p) for p in evals["prompt"]]
        candidate, _ = model(f"{it}/checkpoint/step=1")
        generated = evals["token_logps"].cast(pl.List(pl.Float64)).list.sum().to_list()
        forced = completion_logps(candidate, prompt_ids, ids, pad_id=fmt.pad_id, batch_size=16)
        assert forced == pytest.approx(generated, abs=1e-4)
        # ... so eval_kl, the mean per-token log ratio to the initial policy, needed only the initial policy's pass.
        reference = completion_logps(initial, prompt_ids, ids, pad_id=fmt.pad_id, batch_size=16)
        k1 = [(lp - r) / len(t) for lp, r, t in zip(generated, reference, ids, strict=True)]
        assert row["eval_kl"] == pytest.approx(sum(k1) / len(k1), abs=1e-6) and row["eval_kl"] != 0.0
    # Step metrics are computed in the flow, not as task runs of their own (Prefect's lines go to the run's log).
    log = (fast_run.workdir / ".flywheel" / "logs" / "fast-a.log").read_text()
    assert "Task run 'evaluate-" in log and "Task run 'step-metrics" not in log
    assert fast_run.summary["iterations"][0]["win_rate"] is not None


def test_every_stage_is_committed_with_a_manifest(fast_run):
    expected = ["prompts", "eval_prompts", "labelled", "base", "checkpoint/step=0", "eval/step=0"]
    expected = [f"iteration=0/{s}" for s in expected] + [
        f"iteration={g}/{s}" for g in (1, 2) for s in ("samples", "scored", "filtered/step=1", "checkpoint/step=1", "eval/step=1")
    ]
    for stage in expected:
        manifest = fast_run.manifest(stage)
        assert {"rows", "files", "schema", "config_hash", "parents", "code_version"} <= set(manifest), stage
        for f in manifest["files"]:
            data = (fast_run.path(stage) / f["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"], f"{stage}/{f['name']}"
        if stage.split("/")[1] not in ("base", "checkpoint"):
            assert manifest["rows"] == fast_run.stage(stage).height, stage
            assert fast_run.path(stage).relative_to(fast_run.lake).parts[:3] == (
                stage.split("/")[1], "run=fast-a", stage.split("/")[0]), stage  # {lake}/{table}/run=R/iteration=G
        else:
            assert fast_run.path(stage).relative_to(fast_run.lake).parts[:2] == ("models", "fast-a"), stage
    assert partial_stages(fast_run.lake) == []
    # Lineage: scored comes from samples, which comes from the policy of the previous iteration.
    scored = fast_run.manifest("iteration=2/scored")
    assert scored["parents"] == ["file://" + str(fast_run.path("iteration=2/samples"))]
    samples = fast_run.manifest("iteration=2/samples")
    assert any(p.endswith("/iteration=1/checkpoint/step=1") or p.endswith("/iteration=0/checkpoint/step=0") for p in samples["parents"])


def test_inspect_shows_each_filter_step_with_the_threshold_it_used(fast_run):
    """``flywheel inspect`` as a user runs it: each filtered stage's line names the tau its manifest recorded."""
    import subprocess
    import sys

    uri = f"file://{fast_run.lake}/runs/{fast_run.name}"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", uri], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "filtered/step=1" in line and "kept=" in line]
    assert [f"tau={row['tau']:.3f}" in line for row, line in zip(fast_run.summary["iterations"], lines, strict=True)] == [True] * len(lines)
    assert len(lines) == len(fast_run.summary["iterations"]) > 0
    # Each sample's fate, counted, and the dropped rows shown with the reason the filter gave.
    fates = [line for line in proc.stdout.splitlines() if "decisions/step=1" in line]
    assert len(fates) == len(lines) and all(" kept=" in line and "below_threshold=" in line for line in fates), fates
    dropped = proc.stdout.split("  dropped rows (best first):\n")[1].splitlines()
    assert dropped and all("'reason': '" in row for row in dropped), dropped


def test_rows_carry_the_design_columns(fast_run):
    scored = fast_run.stage("iteration=1/scored")
    assert {"prompt_id", "prompt", "completion", "sample_idx", "policy_version", "reward"} <= set(scored.columns)
    assert "threshold" in fast_run.stage("iteration=1/filtered/step=1").columns
    own = scored.filter(pl.col("sample_idx") >= 0)
    assert own["policy_version"].unique().to_list() == ["iteration=0/checkpoint/step=0"]
    assert sorted(own["sample_idx"].unique().to_list()) == [0, 1, 2, 3]
    assert own.group_by("prompt_id").len()["len"].unique().to_list() == [4]


def test_the_lake_reads_with_polars_hive_partitioning(fast_run):
    for p in fast_run.lake.rglob("*.parquet"):
        names = pq.read_schema(p).names
        assert not {"run", "iteration", "step"} & set(names), f"{p}: a partition key written as a column"
    # A table is one prefix: a glob over it, with hive partitioning, is every iteration of every run.
    samples = pl.scan_parquet(str(fast_run.lake / "samples" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert samples.group_by("run", "iteration").len().sort("iteration").rows() == [("fast-a", 1, 340), ("fast-a", 2, 340)]
    filtered = pl.scan_parquet(str(fast_run.lake / "filtered" / "**" / "*.parquet"), hive_partitioning=True).collect()
    kept = {r["iteration"]: r["kept"] for r in fast_run.summary["iterations"]}
    assert filtered.group_by("iteration", "step").len().sort("iteration").rows() == [(g, 1, kept[g]) for g in (1, 2)]
    # One partition folder holds only its parts.
    one = pl.scan_parquet(str(fast_run.path("iteration=1/scored") / "*.parquet")).collect()
    assert one.equals(fast_run.stage("iteration=1/scored"))


def test_the_lake_reads_with_pyarrow_dataset(fast_run):
    # pyarrow's dataset reader pointed at a table prefix: no glob, no non-Parquet file in the way.
    frame = pl.from_arrow(ds.dataset(str(fast_run.lake / "filtered"), format="parquet", partitioning="hive").to_table())
    kept = {r["iteration"]: r["kept"] for r in fast_run.summary["iterations"]}
    assert frame.group_by("iteration", "step").len().sort("iteration").rows() == [(g, 1, kept[g]) for g in (1, 2)]
    scored = ds.dataset(str(fast_run.path("iteration=2/scored")), format="parquet").to_table()
    assert pl.from_arrow(scored).equals(fast_run.stage("iteration=2/scored"))


def test_champion_moves_only_on_improvement(fast_run):
    s = fast_run.summary
    best, champion = s["baseline"]["eval_reward"], s["baseline"]["model_version"]
    for row in s["iterations"]:
        assert row["promoted"] == (row["eval_reward"] > best), row
        if row["promoted"]:
            best, champion = row["eval_reward"], row["model_version"]
    assert s["champion"]["version"] == champion and s["champion"]["eval_reward"] == best
    client = client_for(fast_run.workdir)
    alias = client.get_model_version_by_alias(MODEL, "champion")
    assert str(alias.version) == champion
    assert float(alias.tags["flywheel.eval_reward"]) == best


def test_champion_loads_with_mlflow_pyfunc_and_generates_what_was_evaluated(fast_run):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(fast_run.workdir))
    mlflow.set_registry_uri(tracking_uri(fast_run.workdir))
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    version = client_for(fast_run.workdir).get_model_version_by_alias(MODEL, "champion")
    evaluated = fast_run.stage(f"iteration={version.tags['flywheel.iteration']}/eval/step={version.tags['flywheel.step']}")
    prompts = evaluated["prompt"].to_list()[:12]
    out = model.predict(prompts, params={"max_new_tokens": 5})
    assert list(out) == evaluated["completion"].to_list()[:12]
    assert all(isinstance(c, str) for c in out)


def test_mlflow_has_a_parent_run_with_nested_runs_and_dataset_inputs(fast_run):
    client = client_for(fast_run.workdir)
    experiment = client.get_experiment_by_name("flywheel")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("flywheel.kind") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "fast-a" and parent.data.params["grow.samples_per_prompt"] == "4"
    nested = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: int(r.data.tags["flywheel.iteration"]),
    )
    assert [r.data.tags["flywheel.iteration"] for r in nested] == ["0", "1", "2"]
    # The flow ended, so did its runs: nothing is left RUNNING.
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in nested)
    for run in nested:
        inputs = run.inputs.dataset_inputs
        contexts = {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"}
        assert contexts == {"training", "evaluation"}, run.info.run_name
        assert all("file://" + str(fast_run.lake) in i.dataset.source and "run=fast-a/" in i.dataset.source for i in inputs)
        assert {i.dataset.name.split("/", 1)[0] for i in inputs} >= {"eval"}  # named table/partition
        assert "eval_reward" in run.data.metrics
    # One model version per step, each logged from its iteration's nested run, tagged with its lineage.
    versions = versions_of(fast_run.workdir)
    assert [str(v.version) for v in versions] == ["1", "2", "3"]
    for v, run in zip(versions, nested, strict=True):
        assert v.run_id == run.info.run_id
        assert v.tags["flywheel.run"] == "fast-a" and v.tags["flywheel.iteration"] == run.data.tags["flywheel.iteration"]
        lineage = json.loads(v.tags["flywheel.datasets"])
        assert all(Path(d["uri"].removeprefix("file://")).exists() for d in lineage)
    first = json.loads(versions[1].tags["flywheel.datasets"])[0]
    assert first["uri"].endswith("/filtered/run=fast-a/iteration=1/step=1")
    assert (first["table"], first["partition"]) == ("filtered", "run=fast-a/iteration=1/step=1")


# -- (b) determinism -----------------------------------------------------------------------------
def test_same_recipe_and_seed_give_identical_datasets_and_metrics(fast_run, fast_run_again):
    a, b = fast_run, fast_run_again
    stages = ["iteration=0/prompts", "iteration=0/eval_prompts", "iteration=0/labelled", "iteration=0/eval/step=0"]
    stages += [f"iteration={g}/{s}" for g in (1, 2) for s in ("samples", "scored", "filtered/step=1", "eval/step=1")]
    for stage in stages:
        fa, fb = a.stage(stage), b.stage(stage)
        assert fa.height > 0, stage
        assert fa.equals(fb), stage
    for stage in ("iteration=0/checkpoint/step=0", "iteration=1/checkpoint/step=1", "iteration=2/checkpoint/step=1"):
        weights = [(r.path(stage) / "model.safetensors").read_bytes() for r in (a, b)]
        assert weights[0] == weights[1], stage
    assert measured(a.summary) == measured(b.summary)
    metrics = [client_for(r.workdir).search_runs(
        [client_for(r.workdir).get_experiment_by_name("flywheel").experiment_id],
        filter_string="tags.`flywheel.kind` = 'parent'",
    )[0].data.metrics for r in (a, b)]
    metrics = [{k: v for k, v in m.items() if not k.startswith(RESOURCE_FIGURES)}
               for m in metrics]  # what was measured, not how fast
    assert metrics[0] == metrics[1] and "eval_reward" in metrics[0]


# -- the champion is not moved by a step that does not improve -----------------------------------
def test_a_step_that_does_not_improve_is_registered_but_not_promoted(workdir, capsys):
    # A learning rate of 1e-12 leaves every greedy answer as it was: the same held-out reward.
    rc = flywheel(RECIPE, *FAST, "improve.lr=1e-12", "eval.patience=1", run="flat")
    assert rc == 0, capsys.readouterr().err[-3000:]
    s = summary_of(workdir, "flat")
    [row] = s["iterations"]
    assert row["eval_reward"] == s["baseline"]["eval_reward"]
    assert (row["model_version"], row["promoted"]) == ("2", False)
    assert s["champion"]["version"] == "1"
    assert s["stopped"] == "held-out reward did not improve for 1 Improve step(s)"
    assert str(client_for(workdir).get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert [str(v.version) for v in versions_of(workdir)] == ["1", "2"]


# -- a Grow step whose filter keeps nothing ------------------------------------------------------
def test_a_filter_that_keeps_nothing_skips_improve_and_the_run_completes(workdir, capsys, caplog):
    caplog.set_level(logging.INFO)
    rc = flywheel(RECIPE, *FAST, "filter.kind=fixed", "filter.threshold=2.0", run="none-kept")
    out = capsys.readouterr().out
    assert rc == 0
    s = summary_of(workdir, "none-kept")
    assert [(r["iteration"], r["step"], r["kept"], r["eval_reward"], r["model_version"], r["promoted"]) for r in s["iterations"]] == [
        (1, 1, 0, None, None, False),
        (2, 1, 0, None, None, False),
    ]
    assert all(r["tau"] == 2.0 and r["samples"] == 340 and r["skipped"] for r in s["iterations"])
    assert s["stopped"] == "completed all Grow steps" and s["champion"]["version"] == "1"
    assert [str(v.version) for v in versions_of(workdir)] == ["1"]  # the baseline only
    lake = workdir / "lake"
    assert not stage_dir(lake, "none-kept", "iteration=1/checkpoint/step=1").exists()
    assert not stage_dir(lake, "none-kept", "iteration=1/eval/step=1").exists()
    assert read_stage(lake, "none-kept", "iteration=1/filtered/step=1").height == 0
    assert partial_stages(workdir / "lake") == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("kept no rows" in m and "skipping this Improve step" in m for m in messages), messages
    assert "skipped" in out  # the table says so too


# -- learning at demo-like size ------------------------------------------------------------------
@pytest.mark.slow
def test_the_issue_small_recipe_improves_on_the_arithmetic_task(workdir):
    rc = flywheel(RECIPE, *SMALL, "eval.patience=2", run="small")
    assert rc == 0
    s = summary_of(workdir, "small")
    assert len(s["iterations"]) == 2
    assert s["champion"]["eval_reward"] > s["baseline"]["eval_reward"] + 0.1, s
    assert partial_stages(workdir / "lake") == []
