"""``flywheel sql`` and ``flywheel runs`` through the CLI, on a real run's lake.

"How many rows did each Improve step drop, and why" is one query whose answer equals the filter's own
counts; stages read as tables with run/iteration/step columns; a bad query is one sentence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.flywheel_helpers import FAST, RECIPE, MANIFEST, flywheel, one_torch_thread, read_stage  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("sql")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert flywheel(RECIPE, *FAST, run="q") == 0
    finally:
        os.chdir(cwd)
    return work / "lake"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_drops_per_reason_for_each_improve_step_is_one_query(lake):
    proc = cli("sql", "SELECT iteration, step, drop_reason, n FROM drops ORDER BY iteration, drop_reason",
               "--lake", f"file://{lake}", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    for g in (1, 2):
        manifest = json.loads((lake / "q" / f"iteration={g}" / "filtered" / "step=1" / MANIFEST).read_text())
        assert {r["drop_reason"]: r["n"] for r in rows if r["iteration"] == g} == manifest["dropped"]
        scored = read_stage(lake / "q" / f"iteration={g}" / "scored")
        kept = read_stage(lake / "q" / f"iteration={g}" / "filtered" / "step=1")
        assert sum(r["n"] for r in rows if r["iteration"] == g) == scored.height - kept.height


def test_every_scored_row_has_a_decision_and_a_reason(lake):
    proc = cli("sql", "SELECT d.iteration, d.reason, count(*) AS n, min(s.reward) AS lo, max(s.reward) AS hi "
               "FROM decisions d JOIN scored s ON d.run = s.run AND d.iteration = s.iteration "
               "AND d.prompt_id = s.prompt_id AND d.sample_idx = s.sample_idx GROUP BY d.iteration, d.reason",
               "--lake", f"file://{lake}", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    for g in (1, 2):
        manifest = json.loads((lake / "q" / f"iteration={g}" / "filtered" / "step=1" / MANIFEST).read_text())
        by_reason = {r["reason"]: r for r in rows if r["iteration"] == g}
        scored = read_stage(lake / "q" / f"iteration={g}" / "scored")
        assert sum(r["n"] for r in by_reason.values()) == scored.height
        assert by_reason["kept"]["n"] == manifest["rows"]
        assert {k: v["n"] for k, v in by_reason.items() if k != "kept"} == {k: n for k, n in manifest["dropped"].items() if n}
        assert by_reason["below_threshold"]["hi"] < manifest["config"]["tau"] <= by_reason["kept"]["lo"]


def test_stage_tables_span_iterations_with_their_partition_columns(lake):
    proc = cli("sql", "SELECT run, iteration, count(*) AS n, avg(reward) AS r FROM scored GROUP BY run, iteration "
               "ORDER BY iteration", "--lake", f"file://{lake}", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    got = pl.read_csv(proc.stdout.encode())
    for row in got.iter_rows(named=True):
        scored = read_stage(lake / "q" / f"iteration={row['iteration']}" / "scored")
        assert row["run"] == "q" and row["n"] == scored.height
        assert row["r"] == pytest.approx(scored["reward"].mean())
    assert got["iteration"].to_list() == [1, 2]


def test_runs_lists_status_iterations_and_champion(lake):
    proc = cli("runs", "--lake", f"file://{lake}", "--json")
    assert proc.returncode == 0, proc.stderr
    [run] = json.loads(proc.stdout)
    summary = json.loads((lake / "q" / "summary.json").read_text())
    assert run["run"] == "q" and run["status"] == "finished" and run["iterations"] == 2
    assert run["champion"] == f"{summary['champion']['model_name']} v{summary['champion']['version']}"
    assert run["started"]


def test_a_bad_query_is_one_sentence(lake):
    proc = cli("sql", "SELECT nope FROM scored", "--lake", f"file://{lake}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("flywheel:")]
    assert "nope" in line and "scored" in line and "drops" in line
