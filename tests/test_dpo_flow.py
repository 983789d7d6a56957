"""Iterative DPO end to end through the real CLI (``flows.cli.main``) on the built-in arithmetic task:
held-out reward rises over the warm-started baseline, the ``pairs`` stage holds best-vs-worst pairs
with the reference log-probs the loss needs, and every iteration is a registered MLflow version.

Everything is real, as in ``test_rest_flow.py``: the embedded Prefect API, MLflow on SQLite in a
temporary directory, the lake on the local filesystem, the built-in tiny model on CPU. The ``slow``
test runs the demo recipe unchanged (the README's DPO row).

Run: ``.venv/bin/python -m pytest tests/test_dpo_flow.py -q`` (``-m 'not slow'`` for the fast one).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import polars as pl
import pytest

# Bind Prefect's console handler to pytest's session-long capture (see test_rest_flow.py).
from prefect import flow as _prefect_flow  # noqa: F401

from alignment.loss_table import LOSSES
from tests.flywheel_helpers import (
    ROOT,
    client_for,
    flywheel,
    manifest_path,
    one_torch_thread,  # noqa: F401  (autouse: one intra-op thread for this module)
    partial_stages,
    read_stage,
    summary_of,
    versions_of,
)

RECIPE = ROOT / "recipes" / "arithmetic-dpo.yaml"
MODEL = "arithmetic-dpo"
# Two iterations on a third of the demo's prompts: the warm start gets about 4 in 10 held-out sums
# right and each iteration has 100+ pairs. About 15 s of compute on one core.
FAST = ["task.n_prompts=200", "task.n_eval=100", "warm_start.epochs=20", "grow_steps=2"]


def _run(workdir: Path, name: str, *sets: str) -> tuple[int, str]:
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.chdir(workdir)
        rc = flywheel(RECIPE, *sets, run=name)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("dpo-fast")
    rc, out = _run(workdir, "dpo-fast", *FAST)
    assert rc == 0, out
    return workdir


def test_held_out_reward_rises_over_the_baseline(fast_run):
    s = summary_of(fast_run, "dpo-fast")
    assert s["algorithm"] == "iterative_dpo" and s["stopped"] == "completed all iterations"
    assert [row["iteration"] for row in s["iterations"]] == [1, 2]
    baseline = s["baseline"]["eval_reward"]
    assert all(row["eval_reward"] > baseline for row in s["iterations"]), s
    assert s["champion"]["eval_reward"] >= baseline + 0.1, s


def test_pairs_put_a_better_answer_first_with_its_reference_log_probs(fast_run):
    s = summary_of(fast_run, "dpo-fast")
    for row in s["iterations"]:
        it, lake = f"iteration={row['iteration']}", fast_run / "lake"
        pairs, scored = read_stage(lake, "dpo-fast", f"{it}/pairs"), read_stage(lake, "dpo-fast", f"{it}/scored")
        assert row["kept"] == pairs.height > 0 and row["samples"] == scored.height
        assert row["tau"] is None and row["loss"] == "dpo"
        assert (pairs["chosen_reward"] > pairs["rejected_reward"]).all()
        assert (pairs["margin"] == pairs["chosen_reward"] - pairs["rejected_reward"]).all()
        assert pairs["prompt_id"].n_unique() == pairs.height  # best vs worst: one pair per prompt
        assert LOSSES["dpo"].needs_reference
        for column in ("ref_chosen_logp", "ref_rejected_logp"):
            assert pairs[column].null_count() == 0 and (pairs[column] < 0).all()
        # Every scored row has a fate: kept when a pair uses it, else dropped with its reason.
        fates = read_stage(lake, "dpo-fast", f"{it}/decisions/step=1")
        assert fates.height == scored.height
        used = pl.concat([pairs.select("prompt_id", pl.col(c).alias("sample_idx")) for c in ("chosen_idx", "rejected_idx")]).unique()
        assert fates.filter(pl.col("decision") == "kept").height == used.height
        assert set(fates.filter(pl.col("decision") == "dropped")["reason"]) <= {"no_reward", "truncated", "no_pair"}
        dropped = json.loads(manifest_path(lake, "dpo-fast", f"{it}/pairs").read_text())["dropped"]
        assert sum(dropped.values()) == scored.height - used.height
        # The kept samples' figures are logged for a preference step too.
        assert 0 < row["kept_fraction"] <= 1 and row["kept_reward_mean"] is not None
    assert partial_stages(fast_run / "lake") == []


def test_every_iteration_is_a_registered_version_and_the_best_is_champion(fast_run):
    s = summary_of(fast_run, "dpo-fast")
    versions = versions_of(fast_run, MODEL)
    assert [str(v.version) for v in versions] == ["1", "2", "3"]
    assert [row["model_version"] for row in s["iterations"]] == ["2", "3"]
    best = max([s["baseline"], *s["iterations"]], key=lambda row: row["eval_reward"])
    assert s["champion"] == {"model_name": MODEL, "version": best["model_version"], "eval_reward": best["eval_reward"]}
    alias = client_for(fast_run).get_model_version_by_alias(MODEL, "champion")
    assert str(alias.version) == best["model_version"]


@pytest.mark.slow
def test_the_demo_recipe_reproduces_the_readme_row(workdir):
    """The README's DPO row (demo recipe unchanged): 0.370 -> 0.775 measured with the tiny Llama."""
    rc, out = _run(workdir, "demo")
    assert rc == 0, out
    s = summary_of(workdir, "demo")
    assert len(s["iterations"]) == 3
    assert s["champion"]["eval_reward"] >= s["baseline"]["eval_reward"] + 0.30, s
    assert partial_stages(workdir / "lake") == []


@pytest.mark.parametrize("loss", ["simpo", "rloo"])
def test_an_iteration_without_pairs_trains_only_a_loss_that_needs_none(tmp_path, loss):
    """Exact-match rewards are 0 or 1, so a margin of 2 leaves no pairs: a pairwise loss skips the
    iteration (nothing trained, nothing registered); RLOO trains on the scored samples all the same.
    Neither loss reads a reference, so the pairs carry no reference log-probs and none was computed."""
    name = f"nopairs-{loss}"
    rc, out = _run(tmp_path, name, "task.n_prompts=40", "task.n_eval=40", "warm_start.epochs=5", "grow_steps=1",
                   "grow.samples_per_prompt=4", f"preference.loss={loss}", "preference.min_margin=2.0")
    assert rc == 0, out
    (row,) = summary_of(tmp_path, name)["iterations"]
    assert row["kept"] == 0 and row["samples"] > 0
    pairs = json.loads(manifest_path(tmp_path / "lake", name, "iteration=1/pairs").read_text())
    assert pairs["rows"] == 0 and pairs["config"]["reference_logps"] is False
    checkpoint = tmp_path / "lake" / "models" / name / "iteration=1" / "checkpoint"
    if LOSSES[loss].trains_on == "pairs":
        assert row["skipped"] == "no pairs above the margin" and row["model_version"] is None
        assert "no pairs" in out and not checkpoint.exists()
    else:
        assert "skipped" not in row and row["model_version"] == "2" and row["loss"] == "rloo"
        assert (checkpoint / "step=1" / "_manifest.json").is_file()
    assert partial_stages(tmp_path / "lake") == []
