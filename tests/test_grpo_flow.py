"""GRPO end to end through the real CLI on the built-in arithmetic task: a small run inspected from every side
(summary, the step tables, decisions, stored log-probs, dropped checkpoints, MLflow's per-step diagnostics),
bad settings refused before anything is written, and (slow) the recipe's run learning, and a run SIGKILLed
during a step's μ epochs resuming to the data of an uninterrupted one.

Run: ``.venv/bin/python -m pytest tests/test_grpo_flow.py -q`` (``-m 'not slow'`` for the fast ones).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

# Prefect's console handler binds to the stderr of the moment it is imported (see test_rest_flow.py).
from prefect import flow as _prefect_flow  # noqa: F401

from tasks.lake import MANIFEST, Lake
from tests.flywheel_helpers import (
    RESOURCE_FIGURES,
    ROOT,
    client_for,
    flywheel,
    one_torch_thread,  # noqa: F401  (autouse: one intra-op thread for this module)
    partial_stages,
    summary_of,
    versions_of,
)

RECIPE = ROOT / "recipes" / "arithmetic-grpo.yaml"
MODEL = "arithmetic-grpo"
# Two iterations of three steps, 16 prompts x G=4 each: a minute on one core. Short completions (3 tokens)
# so some samples are truncated and the filter drops them.
SMALL = [
    "task.n_labelled=100", "task.n_prompts=60", "task.n_eval=40", "warm_start.epochs=20", "grow_steps=2",
    "grow.samples_per_prompt=4", "grow.max_new_tokens=3", "grpo.steps_per_iteration=3", "grpo.prompts_per_step=16",
    "grpo.batch_size=4", "grpo.epochs=2",
]
DIAGNOSTICS = ("reward_mean", "reward_std", "frac_reward_zero_std", "clip_ratio_low", "clip_ratio_high", "kl", "entropy",
               "completion_length", "truncated_fraction", "pg_loss", "grad_norm")  # fmt: skip


class Run:
    def __init__(self, workdir: Path, name: str, rc: int, out: str):
        self.workdir, self.name, self.rc, self.out = workdir, name, rc, out
        self.lake = Lake(str(workdir / "lake"))
        self.summary = summary_of(workdir, name) if rc == 0 else None

    def read(self, iteration: int, stage: str, step: int | None = None) -> pl.DataFrame:
        return self.lake.read(self.lake.stage_uri(self.name, iteration, stage, step))

    def done(self, iteration: int, stage: str, step: int | None = None) -> bool:
        return self.lake.is_done(self.lake.stage_uri(self.name, iteration, stage, step))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Run:
    workdir = tmp_path_factory.mktemp("grpo")
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.chdir(workdir)
        rc = flywheel(RECIPE, *SMALL, run="grpo-small")
    run = Run(workdir, "grpo-small", rc, buf.getvalue())
    assert rc == 0, run.out[-3000:]
    return run


def test_one_row_per_iteration_with_its_steps(small):
    s = small.summary
    assert (s["algorithm"], s["stopped"]) == ("grpo", "completed all iterations")
    assert [(r["iteration"], r["step"]) for r in s["iterations"]] == [(1, 3), (2, 3)]
    for row in s["iterations"]:
        assert [step["step"] for step in row["steps"]] == [1, 2, 3]
        assert row["samples"] == sum(step["samples"] for step in row["steps"]) == 3 * 16 * 4
        assert row["kept"] == sum(step["kept"] for step in row["steps"]) > 0
        trained = [step for step in row["steps"] if step["kept"]]
        assert trained and all(set(DIAGNOSTICS) <= set(step) for step in trained)
        assert all(0 <= step["frac_reward_zero_std"] <= 1 and step["grad_norm"] > 0 for step in trained)
        assert row["eval_accuracy"] is not None and row["model_version"]
    assert re.search(r"^\s+2\s+3\s+-\s+192\s+\d+\s+\d\.\d{3}", small.out, re.M), small.out  # the console table


def test_each_step_has_its_tables_and_each_row_its_fate(small):
    for g in (1, 2):
        for i in (1, 2, 3):
            scored, fates, groups = small.read(g, "scored", i), small.read(g, "decisions", i), small.read(g, "groups", i)
            assert scored.height == 16 * 4 and scored["prompt_id"].n_unique() == 16
            assert fates.height == scored.height and set(fates["reason"]) <= {"kept", "truncated", "zero_std_group"}
            assert fates.filter(pl.col("decision") == "kept").height == groups.height
            # A kept group's rewards differ; the dropped groups' do not (or a truncated sample left one alone).
            spread = groups.group_by("prompt_id").agg(pl.col("reward").n_unique().alias("n"))["n"]
            assert (spread > 1).all()
            assert (groups["finish_reason"] == "stop").all()
            # Advantages are group-relative: they sum to zero within each group.
            assert groups.group_by("prompt_id").agg(pl.col("advantage").sum().abs())["advantage"].max() < 1e-9
            # One stored log-prob per sampled token, the end id included.
            assert (groups["old_logps"].list.len() == groups["num_tokens"]).all()
            if i == 1:  # the step's sampling policy is the iteration's start, which is pi_ref (reference: iteration)
                assert groups["old_logps"].to_list() == groups["ref_logps"].to_list()
            if groups.height:
                updates = small.read(g, "updates", i)
                assert updates["update"].to_list() == list(range(1, updates.height + 1)) and set(updates["epoch"]) == {1, 2}
    reasons = pl.concat([small.read(g, "decisions", i) for g in (1, 2) for i in (1, 2, 3)])["reason"]
    assert {"kept", "zero_std_group", "truncated"} <= set(reasons)


def test_the_lake_keeps_one_model_per_iteration(small):
    models = small.workdir / "lake" / "models" / small.name
    kept = sorted(p.parent.relative_to(models).as_posix() for p in models.rglob(MANIFEST))
    assert kept == ["iteration=0/base", "iteration=0/checkpoint/step=0", "iteration=1/checkpoint/step=3",
                    "iteration=2/checkpoint/step=3"]  # fmt: skip
    assert sorted(p.relative_to(models).as_posix() for p in models.glob("iteration=*/checkpoint/step=*")) == [
        "iteration=0/checkpoint/step=0", "iteration=1/checkpoint/step=3", "iteration=2/checkpoint/step=3"]  # nothing else left
    assert partial_stages(small.workdir / "lake") == []
    assert [v.tags["flywheel.step"] for v in versions_of(small.workdir, MODEL)] == ["0", "3", "3"]


def test_mlflow_iteration_runs_carry_every_steps_diagnostics(small):
    client = client_for(small.workdir)
    runs = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id])
    iterations = {r.data.tags.get("flywheel.iteration"): r for r in runs if r.info.run_id != small.summary["mlflow"]["run_id"]}
    for g in ("1", "2"):
        run_id = iterations[g].info.run_id
        steps = [s["step"] for s in small.summary["iterations"][int(g) - 1]["steps"] if s["kept"]]
        for name in DIAGNOSTICS:
            history = client.get_metric_history(run_id, name)
            assert sorted({m.step for m in history}) == steps, (g, name)


def test_the_report_draws_the_steps_diagnostics(small):
    from flows.cli import main

    out = small.workdir / "report.html"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", small.name, "--lake", f"file://{small.workdir / 'lake'}", "--out", str(out)]) == 0
    section = re.search(r'<section id="grpo">(.*?)</section>', out.read_text(), re.S)
    assert section and section.group(1).count('<img alt="plot" src="data:image/png;base64,') == 3
    # one reward histogram per iteration, from its steps' scored and groups stages
    histograms = re.search(r'<section id="histograms">(.*?)</section>', out.read_text(), re.S)
    assert histograms and histograms.group(1).count('<img alt="plot"') == len(small.summary["iterations"]), histograms


def test_the_fast_run_improves_or_keeps_the_champion(small):
    s = small.summary
    assert s["champion"]["eval_reward"] >= s["baseline"]["eval_reward"]


# -- bad settings: one sentence, exit 2, nothing written ---------------------------------------------

BAD = [
    (["grow.samples_per_prompt=1"], ["grow.samples_per_prompt is 1", "2 or more"]),
    (["grpo.epsilon=0"], ["epsilon must be > 0"]),
    (["grpo.epsilon=-0.1"], ["epsilon must be > 0"]),
    (["grpo.epsilon_high=0.1"], ["epsilon_high must be >= epsilon"]),
    (["grpo.loss_agg=mean"], ["loss_agg must be one of sequence, token", "'mean'"]),
    (["grpo.scale_rewards=batch"], ["grpo.scale_rewards", "'batch'"]),
    (["grpo.beta=-1"], ["beta must be >= 0"]),
    (["grow.include_labelled=true"], ["grow.include_labelled"]),
    (["algorithm=rest", "grpo.prompts_per_step=8"], ["grpo.* keys apply to algorithm: grpo", "runs rest"]),
    (["algorithm=iterative_dpo", "grpo.epsilon=0.3"], ["grpo.* keys apply to algorithm: grpo"]),
    (["algorithm=iterative_dpo", "preference.loss=grpo"], ["preference", "set algorithm: grpo"]),
]


@pytest.mark.parametrize(("sets", "expect"), BAD, ids=[" ".join(s) for s, _ in BAD])
def test_bad_grpo_settings_are_one_sentence_and_write_nothing(tmp_path, sets, expect):
    argv = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", "bad"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'default.db'}"}  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.startswith("flywheel:")]
    assert proc.returncode == 2, out[-3000:]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert all(text in lines[0] for text in expect), lines[0]
    assert not list(tmp_path.rglob(MANIFEST)) and not (tmp_path / "mlflow").exists()


def test_a_batch_larger_than_the_task_is_said_once_and_each_line_names_its_step(tmp_path, prefect_server):
    """``flywheel run`` in a subprocess with more prompts a step than the task has: one warning line before the first
    step (every step samples all of them), and Grow's and Score's lines name the step they belong to."""
    sets = ["task.n_labelled=40", "task.n_prompts=8", "task.n_eval=8", "warm_start.epochs=2", "grow_steps=1",
            "grow.samples_per_prompt=2", "grpo.steps_per_iteration=2", "grpo.prompts_per_step=16"]
    argv = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", "wide", *[a for x in sets for a in ("--set", x)]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PREFECT_API_URL": prefect_server}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    warned = [i for i, line in enumerate(lines) if "prompts_per_step" in line]
    assert [lines[i] for i in warned] == [
        "warning: grpo.prompts_per_step=16 is more than the task's 8 prompts: every step samples all of them"], lines
    assert warned[0] < min(i for i, line in enumerate(lines) if line.startswith("grow g=1 step 1 "))
    for step in (1, 2):
        assert any(re.match(rf"grow g=1 step {step} shard 1/1: 8 prompts -> 16 samples · ", line) for line in lines), lines
        assert any(line.startswith(f"score g=1 step {step}: committed 16 rows in 1 part · ") for line in lines), lines


# -- the recipe as it ships, and a run killed during its updates (slow) -----------------------------------


def _launch(cwd: Path, run: str, *sets: str, tag: str = "only") -> subprocess.Popen:
    argv = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", run, *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect"), "PYTHONPATH": str(ROOT)}
    with (cwd / f"{run}-{tag}.out").open("wb") as out:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 1500) -> None:
    try:
        assert proc.wait(timeout=timeout) == 0, f"exit {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


@pytest.mark.slow
def test_the_recipe_raises_held_out_accuracy_by_30_points(tmp_path):
    """``flywheel run recipes/arithmetic-grpo.yaml`` as it ships, in a subprocess (the README gives its wall time)."""
    start = time.monotonic()
    proc = _launch(tmp_path, "grpo-recipe")
    _finish(proc)
    wall = time.monotonic() - start
    s = summary_of(tmp_path, "grpo-recipe")
    best = max(r["eval_accuracy"] for r in s["iterations"] if r["eval_accuracy"] is not None)
    print(f"arithmetic-grpo: held-out accuracy {s['baseline']['eval_accuracy']:.3f} -> {best:.3f} in {wall:.0f} s")
    assert best - s["baseline"]["eval_accuracy"] >= 0.30, (s["baseline"]["eval_accuracy"], best)
    assert s["champion"]["eval_reward"] == best  # exact match: reward is accuracy


def _step_data(cwd: Path, run: str) -> dict[str, pl.DataFrame]:
    lake = Lake(str(cwd / "lake"))
    out = {}
    for a in sorted(lake.committed(run), key=lambda a: (a.stage, a.iteration, a.step or 0)):
        if a.iteration == 0 or not a.is_table:
            continue
        frame = lake.read(a.uri)
        keys = [c for c in ("prompt_id", "sample_idx", "update") if c in frame.columns]
        out[a.label + f"@{a.iteration}"] = frame.sort(keys) if keys else frame
    return out


@pytest.mark.slow
def test_a_run_killed_during_its_updates_resumes_to_the_same_data(tmp_path):
    """SIGKILL while step 3 of iteration 1 trains (step 1's checkpoint already dropped, step 2's the latest): the
    same ``--run-name`` again trains step 3 from step 2's checkpoint and ends with the data of an uninterrupted run."""
    sets = [*SMALL, "grpo.epochs=6"]  # μ = 6: the updates take long enough to be caught in the middle
    resumed_dir, reference_dir = tmp_path / "resumed", tmp_path / "reference"
    resumed_dir.mkdir()
    reference_dir.mkdir()
    reference = _launch(reference_dir, "uninterrupted", *sets)
    first = _launch(resumed_dir, "resumed", *sets, tag="killed")
    lake = Lake(str(resumed_dir / "lake"))
    groups3, ckpt3 = lake.stage_uri("resumed", 1, "groups", 3), lake.stage_uri("resumed", 1, "checkpoint", 3)
    cache = resumed_dir / ".flywheel" / "cache"
    deadline = time.monotonic() + 900
    while not (lake.is_done(groups3) and any(cache.glob("tmp*"))):  # step 3's groups committed, its training begun
        assert first.poll() is None, (resumed_dir / "resumed-killed.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "step 3 of iteration 1 never started training"
        time.sleep(0.02)
    os.killpg(first.pid, 9)
    first.wait(timeout=60)
    assert not lake.is_done(ckpt3) and lake.is_done(lake.stage_uri("resumed", 1, "checkpoint", 2))
    assert not (resumed_dir / "lake" / "models" / "resumed" / "iteration=1" / "checkpoint" / "step=1").exists()

    _finish(_launch(resumed_dir, "resumed", *sets, tag="resumed"))
    _finish(reference)
    resumed, uninterrupted = _step_data(resumed_dir, "resumed"), _step_data(reference_dir, "uninterrupted")
    assert resumed.keys() == uninterrupted.keys() and {"groups/step=3@1", "updates/step=3@1", "eval/step=3@1"} <= resumed.keys()
    for name, frame in resumed.items():  # the updates' figures too: the same computation on the same numbers
        assert frame.equals(uninterrupted[name]), name
    versions = lambda d: sorted((v.tags["flywheel.iteration"], v.tags["flywheel.step"]) for v in versions_of(d, MODEL))  # noqa: E731
    assert versions(resumed_dir) == versions(reference_dir) and [g for g, _ in versions(resumed_dir)] == ["0", "1", "2"]
    fast = RESOURCE_FIGURES
    clean = lambda d, r: json.loads(json.dumps([{k: v for k, v in row.items() if not k.startswith(fast) and k != "steps"}  # noqa: E731
                                                 for row in summary_of(d, r)["iterations"]]))
    assert clean(resumed_dir, "resumed") == clean(reference_dir, "uninterrupted")
    steps = lambda d, r: [[{k: v for k, v in s.items() if not k.startswith(fast)} for s in row["steps"]]  # noqa: E731
                          for row in summary_of(d, r)["iterations"]]
    assert steps(resumed_dir, "resumed") == steps(reference_dir, "uninterrupted")


def test_inspect_reads_a_run_step_by_step(small):
    """``flywheel inspect`` as a user runs it on a GRPO run: each step's stages in the order the step made
    them, each sample's fate counted, the kept groups against their scored parent with their advantages,
    the dropped ones with their reason, and the mean diagnostics of each step's updates."""
    uri = f"file://{small.workdir / 'lake'}/runs/{small.name}"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", uri], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    heads = [line.split() for line in proc.stdout.splitlines() if line.startswith(f"  {small.name} iteration=1 ")]
    stages = [h[2] for h in heads]
    expected = [f"{t}/step={i}" for i in (1, 2, 3) for t in ("samples", "scored", "decisions", "groups", "updates")]
    assert stages == [*expected, "checkpoint/step=3", "eval/step=3"], stages
    for i in (1, 2, 3):
        fates = dict(f.split("=") for f in heads[stages.index(f"decisions/step={i}")][4:])
        groups = small.read(1, "groups", i)
        assert int(fates["kept"]) == groups.height and sum(map(int, fates.values())) == 16 * 4, fates
        assert heads[stages.index(f"groups/step={i}")][4].startswith("kept=")
        means = heads[stages.index(f"updates/step={i}")]
        assert means[4] == "mean" and float(dict(m.split("=") for m in means[5:])["kl"]) >= 0, means
    assert proc.stdout.count("\n    iteration=") == 6  # kept per step, two iterations of three
    kept, dropped = proc.stdout.split("  kept rows of groups/step=3 (iteration=2):\n")[1].split("  dropped rows (best first):\n")
    last = small.read(2, "groups", 3).height
    assert kept.count("'advantage': ") == min(5, last) and dropped.count("'reason': ") == min(5, 16 * 4 - last) > 0
    # The console's Grow and Score lines say which step they belong to, as the filter's do.
    assert re.search(r"^grow g=2 step 3 shard 1/1: 16 prompts -> 64 samples", small.out, re.M), small.out
    assert re.search(r"^score g=2 step 3: committed 64 rows in 1 part · ", small.out, re.M)
    assert "prompts_per_step" not in small.out  # 16 prompts a step of 60: no note that a step samples them all
    # The run's models, and nothing else, under {lake}/models/RUN: the one model each iteration keeps.
    models = subprocess.run([sys.executable, "-m", "flows.cli", "inspect", f"file://{small.workdir / 'lake'}/models/{small.name}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert models.returncode == 0, models.stderr
    assert [line.split()[1:3] for line in models.stdout.splitlines()[1:]] == [
        ["iteration=0", "base"], ["iteration=0", "checkpoint/step=0"], ["iteration=1", "checkpoint/step=3"],
        ["iteration=2", "checkpoint/step=3"]], models.stdout  # fmt: skip
    assert all(" world_size=1 " in line for line in models.stdout.splitlines() if "checkpoint (" in line)  # how each trained
