"""ReST end to end through the real CLI (``flows.cli.main``): the lake, MLflow, determinism, a user's own
task, bad input and resuming.

Everything is real: flows on the embedded Prefect API, MLflow on SQLite in a temporary directory,
the lake on the local filesystem, the built-in tiny GPT-2 on CPU. Each run is kept small enough for
the default tier on two busy cores; the ``slow`` tests repeat the learning checks at demo-like sizes.

Run: ``.venv/bin/python -m pytest tests/test_rest_flow.py -q`` (``-m 'not slow'`` for the fast ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import math
import random
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
from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
MANIFEST = "_manifest.json"
MODEL = "arithmetic-rest"  # the demo recipe's name: its registered model

# Small but not trivial: the warm start gets some sums right (about 1 in 8 held out), so Grow/Improve
# has samples to keep and to drop. About 15 s of compute on one core.
FAST = [
    "task.n_labelled=100", "task.n_prompts=60", "task.n_eval=40", "warm_start.epochs=25",
    "grow_steps=2", "grow.samples_per_prompt=4", "improve.epochs=2", "eval.patience=2",
]
# The issue's small recipe (slow tier): big enough that held-out reward visibly rises.
SMALL = [
    "task.n_prompts=200", "task.n_eval=100", "warm_start.epochs=20", "grow_steps=2", "grow.samples_per_prompt=4",
]
SUMMARY_ROW = {"iteration", "step", "tau", "samples", "kept", "eval_reward", "eval_accuracy", "model_version", "promoted"}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """On two cores shared with other jobs a second intra-op thread mostly waits: training gets ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers -----------------------------------------------------------------------------------
def flywheel(recipe: Path | str, *sets: str, run: str) -> int:
    """``flywheel run RECIPE --run-name RUN --set ...`` in this process; returns the exit code."""
    argv = ["run", str(recipe), "--run-name", run]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


@contextlib.contextmanager
def chdir(path: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        yield


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


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and re.search(r"[.!?]\s+[A-Z]", message) is None


def cli_error(err: str) -> str:
    """The CLI's error line: exactly one ``flywheel: ...`` line and no traceback on stderr."""
    lines = [line for line in err.splitlines() if line.startswith("flywheel:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = lines[0].removeprefix("flywheel: ")
    assert one_sentence(message), message
    return message


def file_digests(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- user rewards (found by import path "test_rest_flow:NAME") ------------------------------------
def letters_matched(prompts, completions, references):
    """Partial credit: matching positions over the longer of completion and reference."""
    out = []
    for c, r in zip(completions, references, strict=True):
        c = c.strip()
        out.append(sum(a == b for a, b in zip(c, r)) / max(len(c), len(r), 1))
    return out


def wrong_length(prompts, completions, references):
    return [1.0] * (len(completions) - 1)


def nan_reward(prompts, completions, references):
    return [math.nan if i % 7 == 3 else 0.0 for i in range(len(completions))]


def nan_on_grown_samples(prompts, completions, references):
    """Fine on the 40 held-out prompts, NaN on the 240 grown samples: fails at Score, not at the baseline."""
    return [math.nan if len(completions) > 100 else 1.0 for _ in completions]


# -- (a) one run, inspected from every side ------------------------------------------------------
class Run:
    def __init__(self, workdir: Path, name: str, rc: int, out: str):
        self.workdir, self.name, self.rc, self.out = workdir, name, rc, out
        self.lake = workdir / "lake"
        self.dir = self.lake / name
        self.summary = summary_of(workdir, name) if rc == 0 else None


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
    assert f"summary: {s['lake']}/fast-a/summary.json" in fast_run.out


def test_summary_counts_and_thresholds_match_the_lake(fast_run):
    for row in fast_run.summary["iterations"]:
        it = fast_run.dir / f"iteration={row['iteration']}"
        scored = read_stage(it / "scored")
        kept = read_stage(it / "filtered" / "step=1")
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
        evals = read_stage(it / "eval" / "step=1")
        assert evals.height == 40
        assert row["eval_reward"] == pytest.approx(evals["reward"].mean())
        assert row["eval_accuracy"] == pytest.approx(evals["exact_match"].mean())


def test_every_stage_is_committed_with_a_manifest(fast_run):
    expected = ["prompts", "eval_prompts", "labelled", "base", "checkpoint/step=0", "eval/step=0"]
    expected = [f"iteration=0/{s}" for s in expected] + [
        f"iteration={g}/{s}" for g in (1, 2) for s in ("samples", "scored", "filtered/step=1", "checkpoint/step=1", "eval/step=1")
    ]
    for stage in expected:
        manifest = json.loads((fast_run.dir / stage / MANIFEST).read_text())
        assert {"rows", "files", "schema", "config_hash", "parents", "code_version"} <= set(manifest), stage
        for f in manifest["files"]:
            data = (fast_run.dir / stage / f["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"], f"{stage}/{f['name']}"
        if stage.split("/")[1] not in ("base", "checkpoint"):
            assert manifest["rows"] == read_stage(fast_run.dir / stage).height, stage
    assert partial_stages(fast_run.lake) == []
    # Lineage: scored comes from samples, which comes from the policy of the previous iteration.
    scored = json.loads((fast_run.dir / "iteration=2" / "scored" / MANIFEST).read_text())
    assert scored["parents"] == ["file://" + str(fast_run.dir / "iteration=2" / "samples")]
    samples = json.loads((fast_run.dir / "iteration=2" / "samples" / MANIFEST).read_text())
    assert any(p.endswith("/iteration=1/checkpoint/step=1") or p.endswith("/iteration=0/checkpoint/step=0") for p in samples["parents"])


def test_rows_carry_the_design_columns(fast_run):
    it = fast_run.dir / "iteration=1"
    scored = read_stage(it / "scored")
    assert {"prompt_id", "prompt", "completion", "sample_idx", "policy_version", "reward"} <= set(scored.columns)
    assert "threshold" in read_stage(it / "filtered" / "step=1").columns
    own = scored.filter(pl.col("sample_idx") >= 0)
    assert own["policy_version"].unique().to_list() == ["iteration=0/checkpoint/step=0"]
    assert sorted(own["sample_idx"].unique().to_list()) == [0, 1, 2, 3]
    assert own.group_by("prompt_id").len()["len"].unique().to_list() == [4]


def test_the_lake_reads_with_polars_hive_partitioning(fast_run):
    for p in fast_run.lake.rglob("*.parquet"):
        names = pq.read_schema(p).names
        assert "iteration" not in names and "step" not in names, f"{p}: a partition key written as a column"
    samples = pl.scan_parquet(str(fast_run.dir / "iteration=*" / "samples" / "*.parquet"), hive_partitioning=True).collect()
    assert samples.group_by("iteration").len().sort("iteration").rows() == [(1, 340), (2, 340)]
    filtered = pl.scan_parquet(
        str(fast_run.dir / "iteration=*" / "filtered" / "step=*" / "*.parquet"), hive_partitioning=True
    ).collect()
    kept = {r["iteration"]: r["kept"] for r in fast_run.summary["iterations"]}
    assert filtered.group_by("iteration", "step").len().sort("iteration").rows() == [(g, 1, kept[g]) for g in (1, 2)]
    # One stage folder: the manifest beside the parts does not get in a reader's way.
    one = pl.scan_parquet(str(fast_run.dir / "iteration=1" / "scored" / "*.parquet")).collect()
    assert one.equals(read_stage(fast_run.dir / "iteration=1" / "scored"))


def test_the_lake_reads_with_pyarrow_dataset(fast_run):
    files = sorted(str(p) for p in fast_run.dir.glob("iteration=*/filtered/step=*/*.parquet"))
    table = ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=str(fast_run.dir)).to_table()
    frame = pl.from_arrow(table)
    kept = {r["iteration"]: r["kept"] for r in fast_run.summary["iterations"]}
    assert frame.group_by("iteration", "step").len().sort("iteration").rows() == [(g, 1, kept[g]) for g in (1, 2)]
    # A whole stage folder as a dataset: pyarrow skips the "_manifest.json" beside the parts.
    scored = ds.dataset(str(fast_run.dir / "iteration=2" / "scored"), format="parquet").to_table()
    assert pl.from_arrow(scored).equals(read_stage(fast_run.dir / "iteration=2" / "scored"))


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
    evaluated = read_stage(fast_run.dir / f"iteration={version.tags['flywheel.iteration']}" / "eval" / f"step={version.tags['flywheel.step']}")
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
    for run in nested:
        inputs = run.inputs.dataset_inputs
        contexts = {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"}
        assert contexts == {"training", "evaluation"}, run.info.run_name
        assert all("file://" + str(fast_run.dir) in i.dataset.source for i in inputs)
        assert "eval_reward" in run.data.metrics
    # One model version per step, each logged from its iteration's nested run, tagged with its lineage.
    versions = versions_of(fast_run.workdir)
    assert [str(v.version) for v in versions] == ["1", "2", "3"]
    for v, run in zip(versions, nested, strict=True):
        assert v.run_id == run.info.run_id
        assert v.tags["flywheel.run"] == "fast-a" and v.tags["flywheel.iteration"] == run.data.tags["flywheel.iteration"]
        lineage = json.loads(v.tags["flywheel.datasets"])
        assert all(Path(d["uri"].removeprefix("file://")).exists() for d in lineage)
    assert json.loads(versions[1].tags["flywheel.datasets"])[0]["uri"].endswith("iteration=1/filtered/step=1")


# -- (b) determinism -----------------------------------------------------------------------------
def test_same_recipe_and_seed_give_identical_datasets_and_metrics(fast_run, fast_run_again):
    a, b = fast_run, fast_run_again
    stages = ["iteration=0/prompts", "iteration=0/eval_prompts", "iteration=0/labelled", "iteration=0/eval/step=0"]
    stages += [f"iteration={g}/{s}" for g in (1, 2) for s in ("samples", "scored", "filtered/step=1", "eval/step=1")]
    for stage in stages:
        fa, fb = read_stage(a.dir / stage), read_stage(b.dir / stage)
        assert fa.height > 0, stage
        assert fa.equals(fb), stage
    for stage in ("iteration=0/checkpoint/step=0", "iteration=1/checkpoint/step=1", "iteration=2/checkpoint/step=1"):
        weights = [(r.dir / stage / "model.safetensors").read_bytes() for r in (a, b)]
        assert weights[0] == weights[1], stage
    strip = lambda s: {k: v for k, v in s.items() if k not in ("run", "lake")}  # noqa: E731
    assert strip(a.summary) == strip(b.summary)
    metrics = [client_for(r.workdir).search_runs(
        [client_for(r.workdir).get_experiment_by_name("flywheel").experiment_id],
        filter_string="tags.`flywheel.kind` = 'parent'",
    )[0].data.metrics for r in (a, b)]
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


# -- (c) a user's task unlike the built-in one ----------------------------------------------------
USER_RECIPE = """\
name: reverse-letters
seed: 0
task:
  builtin: null
  prompts: data/prompts.jsonl
  eval: data/eval.jsonl
  labelled: data/labelled.parquet
  prompt_column: question
  reference_column: answer
  completion_column: answer
reward: test_rest_flow:letters_matched
warm_start:
  epochs: 6
  lr: 0.003
  batch_size: 16
grow:
  samples_per_prompt: 4
  max_new_tokens: 5
  include_labelled: false   # Improve learns from the policy's own samples only
improve:
  epochs: 3
eval:
  max_new_tokens: 5
  patience: 2
grow_steps: 2
"""


def write_reverse_task(root: Path, n_labelled: int, n_prompts: int, n_eval: int) -> None:
    """The task "reverse the letters" (``"abc>"`` -> ``"cba"``): prompts as JSONL, labelled data as Parquet."""
    words = ["".join(p) for n in (3, 4) for p in itertools.product("abcde", repeat=n)]
    random.Random(0).shuffle(words)
    labelled, prompts, evals = (
        words[:n_labelled], words[n_labelled : n_labelled + n_prompts], words[n_labelled + n_prompts :][:n_eval]
    )
    data = root / "data"
    data.mkdir()
    for name, ws in (("prompts", prompts), ("eval", evals)):
        with (data / f"{name}.jsonl").open("w") as fh:
            for w in ws:
                fh.write(json.dumps({"question": f"{w}>", "answer": w[::-1], "source": "test"}) + "\n")
    pl.DataFrame({"question": [f"{w}>" for w in labelled], "answer": [w[::-1] for w in labelled]}).write_parquet(
        data / "labelled.parquet"
    )
    (root / "reverse.yaml").write_text(USER_RECIPE)


def _user_task_rises(workdir: Path, monkeypatch, sizes: tuple[int, int, int], *sets: str) -> dict:
    monkeypatch.syspath_prepend(str(HERE))  # the reward lives in this test module
    write_reverse_task(workdir, *sizes)
    rc = flywheel(workdir / "reverse.yaml", *sets, run="reverse")
    assert rc == 0
    s = summary_of(workdir, "reverse")
    evals = read_stage(workdir / "lake" / "reverse" / "iteration=0" / "eval" / "step=0")
    assert evals.height == sizes[2]
    # Partial credit: the baseline gets some letters right but not all.
    assert 0.0 < s["baseline"]["eval_reward"] < 1.0
    assert evals["reward"].n_unique() > 2
    scored = read_stage(workdir / "lake" / "reverse" / "iteration=1" / "scored")
    assert (scored["sample_idx"] >= 0).all(), "grow.include_labelled=false: only the policy's own samples"
    assert s["champion"]["model_name"] == "reverse-letters" and s["champion"]["version"] != "1"
    return s


def test_a_users_own_task_rises_over_its_baseline(workdir, monkeypatch):
    s = _user_task_rises(workdir, monkeypatch, (40, 200, 100), "grow_steps=1")
    assert s["iterations"][0]["eval_reward"] > s["baseline"]["eval_reward"] + 0.05, s


@pytest.mark.slow
def test_a_users_own_task_keeps_rising_over_three_grow_steps(workdir, monkeypatch):
    s = _user_task_rises(workdir, monkeypatch, (40, 400, 150), "grow_steps=3", "warm_start.epochs=5", "eval.patience=3")
    rewards = [s["baseline"]["eval_reward"]] + [r["eval_reward"] for r in s["iterations"]]
    assert s["champion"]["eval_reward"] > rewards[0] + 0.1, rewards
    assert s["champion"]["eval_reward"] == max(rewards)


@pytest.mark.slow
def test_the_issue_small_recipe_improves_on_the_arithmetic_task(workdir):
    rc = flywheel(RECIPE, *SMALL, "eval.patience=2", run="small")
    assert rc == 0
    s = summary_of(workdir, "small")
    assert len(s["iterations"]) == 2
    assert s["champion"]["eval_reward"] > s["baseline"]["eval_reward"] + 0.1, s
    assert partial_stages(workdir / "lake") == []


# -- (d) bad input: exit code 2, one sentence, nothing half-written --------------------------------
def _bad_run(workdir: Path, capsys, caplog, recipe: Path | str, *sets: str) -> str:
    caplog.set_level(logging.INFO)
    rc = flywheel(recipe, *sets, run="bad")
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    message = cli_error(err)
    # A mistake in the input fails the same way every time: it is not retried.
    assert not [r.getMessage() for r in caplog.records if "will start" in r.getMessage()]
    assert partial_stages(workdir / "lake") == []
    assert versions_of(workdir) == []
    assert not (workdir / "lake" / "bad" / "iteration=0" / "eval").exists()
    return message


def _user_files(workdir: Path, prompts: str | None = None) -> list[str]:
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    rows = "".join(json.dumps({"prompt": f"{a}+{b}=", "reference": str(a + b)}) + "\n" for a in range(5) for b in range(4))
    (data / "prompts.jsonl").write_text(rows if prompts is None else prompts)
    (data / "eval.jsonl").write_text(rows)
    return ["task.builtin=null", "task.prompts=data/prompts.jsonl", "task.eval=data/eval.jsonl"]


QUICK = [*FAST, "warm_start.enabled=false"]  # bad input should fail before any training


def test_missing_prompt_file(workdir, capsys, caplog):
    sets = [*_user_files(workdir), "task.prompts=data/nope.jsonl"]
    message = _bad_run(workdir, capsys, caplog, RECIPE, *QUICK, *sets)
    assert "data/nope.jsonl" in message and "does not exist" in message and "task.prompts" in message


def test_prompt_file_without_the_prompt_column(workdir, capsys, caplog):
    sets = _user_files(workdir, prompts='{"question": "1+1=", "reference": "2"}\n')
    message = _bad_run(workdir, capsys, caplog, RECIPE, *QUICK, *sets)
    assert "data/prompts.jsonl" in message and "no column 'prompt'" in message and "task.prompt_column" in message


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["empty", "blank-lines"])
def test_empty_prompt_file(workdir, capsys, caplog, content):
    message = _bad_run(workdir, capsys, caplog, RECIPE, *QUICK, *_user_files(workdir, prompts=content))
    assert "data/prompts.jsonl" in message and "no rows" in message


def test_model_dir_without_config_json(workdir, capsys, caplog):
    (workdir / "my-model").mkdir()
    message = _bad_run(workdir, capsys, caplog, RECIPE, *QUICK, "model.path=my-model")
    assert "my-model" in message and "config.json" in message


@pytest.mark.parametrize(
    ("reward", "expected"),
    [
        ("exact-match", ["Unknown reward 'exact-match'", "exact_match"]),
        ("no_such_reward_module:score", ["'no_such_reward_module'", "ModuleNotFoundError"]),
        ("test_rest_flow:no_such_function", ["no callable 'no_such_function'"]),
        ("test_rest_flow:wrong_length", ["wrong_length returned 39 values for 40 completions"]),
        ("test_rest_flow:nan_reward", ["nan_reward returned a non-finite value", "row(s): 3, 10, 17, 24, 31, 38"]),
    ],
    ids=["unknown-name", "failing-import", "not-callable", "wrong-length", "nan"],
)
def test_bad_reward(workdir, capsys, caplog, monkeypatch, reward, expected):
    monkeypatch.syspath_prepend(str(HERE))
    message = _bad_run(workdir, capsys, caplog, RECIPE, *QUICK, f"reward={reward}")
    for text in expected:
        assert text in message, message


def test_reward_failing_on_grown_samples_leaves_no_half_scored_stage(workdir, capsys, caplog, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    caplog.set_level(logging.INFO)
    rc = flywheel(RECIPE, *QUICK, "reward=test_rest_flow:nan_on_grown_samples", run="bad")
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    message = cli_error(err)
    assert "nan_on_grown_samples returned a non-finite value" in message and "for 240 row(s)" in message
    assert partial_stages(workdir / "lake") == []
    assert not (workdir / "lake" / "bad" / "iteration=1" / "scored").exists()
    assert [str(v.version) for v in versions_of(workdir)] == ["1"]  # the baseline, nothing for iteration 1
    assert not [r.getMessage() for r in caplog.records if "will start" in r.getMessage()]  # not retried


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["grow.samples=4"], "unknown key 'grow.samples'"),
        (["grow.samples_per_prompt=many"], "grow.samples_per_prompt: Input should be a valid integer"),
        (["filter.kind=best"], "filter.kind: Input should be 'rest', 'fixed', 'quantile' or 'top_k'"),
    ],
    ids=["unknown-key", "wrong-type", "not-allowed"],
)
def test_bad_recipe_writes_nothing(workdir, capsys, caplog, sets, expected):
    message = _bad_run(workdir, capsys, caplog, RECIPE, *sets)
    assert expected in message
    assert not (workdir / "lake").exists() and not (workdir / "mlflow").exists()


def test_bad_recipe_file_key(workdir, capsys, caplog):
    path = workdir / "typo.yaml"
    path.write_text(RECIPE.read_text().replace("grow_steps: 3", "grow_step: 3"))
    message = _bad_run(workdir, capsys, caplog, path)
    assert "unknown key 'grow_step'" in message and str(path) in message


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
    run_dir = workdir / "lake" / "none-kept"
    assert not (run_dir / "iteration=1" / "checkpoint").exists() and not (run_dir / "iteration=1" / "eval").exists()
    assert read_stage(run_dir / "iteration=1" / "filtered" / "step=1").height == 0
    assert partial_stages(workdir / "lake") == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("kept no rows" in m and "skipping this Improve step" in m for m in messages), messages
    assert "skipped" in out  # the table says so too


# -- (e) resume ----------------------------------------------------------------------------------
def test_resume_redoes_only_the_unfinished_stage(workdir, capsys):
    assert flywheel(RECIPE, *FAST, run="resume") == 0
    first = capsys.readouterr().out
    summary = summary_of(workdir, "resume")
    versions = [(str(v.version), v.run_id) for v in versions_of(workdir)]
    client = client_for(workdir)
    experiment = client.get_experiment_by_name("flywheel").experiment_id
    runs = sorted(r.info.run_id for r in client.search_runs([experiment]))

    last = summary["iterations"][-1]
    stage = workdir / "lake" / "resume" / f"iteration={last['iteration']}" / "eval" / f"step={last['step']}"
    old_manifest = json.loads((stage / MANIFEST).read_text())
    (stage / MANIFEST).unlink()
    before = file_digests(workdir / "lake")

    assert flywheel(RECIPE, *FAST, run="resume") == 0
    second = capsys.readouterr().out
    after = file_digests(workdir / "lake")

    redone = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    stage_key = str(stage.relative_to(workdir / "lake"))
    assert redone == {f"{stage_key}/{MANIFEST}", f"{stage_key}/part-00000.parquet", "resume/summary.json"}, sorted(redone)
    new_manifest = json.loads((stage / MANIFEST).read_text())
    assert [f["sha256"] for f in new_manifest["files"]] == [f["sha256"] for f in old_manifest["files"]]
    assert new_manifest["metrics"] == old_manifest["metrics"]
    assert summary_of(workdir, "resume") == summary
    assert [(str(v.version), v.run_id) for v in versions_of(workdir)] == versions  # no duplicate model versions
    assert sorted(r.info.run_id for r in client.search_runs([experiment])) == runs  # nor runs
    table = lambda text: [line for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]  # noqa: E731
    assert table(second) == table(first)
