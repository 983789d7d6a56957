"""The lake as tables, on a real lake of two runs: ``flywheel sql``, ``flywheel runs``, pyarrow and DuckDB.

"How many rows did each Improve step drop, and why" is one query whose answer equals the filter's own
counts; each stage is one table prefix that pyarrow's dataset reader and DuckDB read across runs and
iterations with the same numbers as polars; a bad query is one sentence.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pytest

from tasks.lake import TABLES
from tests.flywheel_helpers import FAST, RECIPE, flywheel, manifest_path, one_torch_thread, read_stage  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("sql")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert flywheel(RECIPE, *FAST, run="q") == 0
        assert flywheel(RECIPE, *FAST, "grow_steps=1", "seed=7", run="q2") == 0  # a second run in the same lake
    finally:
        os.chdir(cwd)
    return work / "lake"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_drops_per_reason_for_each_improve_step_is_one_query(lake):
    proc = cli("sql", "SELECT iteration, step, drop_reason, n FROM drops WHERE run = 'q' ORDER BY iteration, drop_reason",
               "--lake", f"file://{lake}", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    for g in (1, 2):
        manifest = json.loads(manifest_path(lake, "q", f"iteration={g}/filtered/step=1").read_text())
        assert {r["drop_reason"]: r["n"] for r in rows if r["iteration"] == g} == manifest["dropped"]
        scored = read_stage(lake, "q", f"iteration={g}/scored")
        kept = read_stage(lake, "q", f"iteration={g}/filtered/step=1")
        assert sum(r["n"] for r in rows if r["iteration"] == g) == scored.height - kept.height


def test_every_scored_row_has_a_decision_and_a_reason(lake):
    proc = cli("sql", "SELECT d.iteration, d.reason, count(*) AS n, min(s.reward) AS lo, max(s.reward) AS hi "
               "FROM decisions d JOIN scored s ON d.run = s.run AND d.iteration = s.iteration "
               "AND d.prompt_id = s.prompt_id AND d.sample_idx = s.sample_idx WHERE d.run = 'q' GROUP BY d.iteration, d.reason",
               "--lake", f"file://{lake}", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    for g in (1, 2):
        manifest = json.loads(manifest_path(lake, "q", f"iteration={g}/filtered/step=1").read_text())
        by_reason = {r["reason"]: r for r in rows if r["iteration"] == g}
        scored = read_stage(lake, "q", f"iteration={g}/scored")
        assert sum(r["n"] for r in by_reason.values()) == scored.height
        assert by_reason["kept"]["n"] == manifest["rows"]
        assert {k: v["n"] for k, v in by_reason.items() if k != "kept"} == {k: n for k, n in manifest["dropped"].items() if n}
        assert by_reason["below_threshold"]["hi"] < manifest["config"]["tau"] <= by_reason["kept"]["lo"]


def test_stage_tables_span_iterations_with_their_partition_columns(lake):
    proc = cli("sql", "SELECT run, iteration, count(*) AS n, avg(reward) AS r FROM scored GROUP BY run, iteration "
               "ORDER BY run, iteration", "--lake", f"file://{lake}", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    got = pl.read_csv(proc.stdout.encode())
    for row in got.iter_rows(named=True):
        scored = read_stage(lake, row["run"], f"iteration={row['iteration']}/scored")
        assert row["n"] == scored.height
        assert row["r"] == pytest.approx(scored["reward"].mean())
    assert got.select("run", "iteration").rows() == [("q", 1), ("q", 2), ("q2", 1)]


def test_csv_writes_a_list_column_as_its_json_text(lake):
    """CSV has no nested values; a list column (GRPO's per-token log-probs, an ARRAY_AGG) is written as JSON, not a traceback."""
    proc = cli("sql", "SELECT run, iteration, ARRAY_AGG(sample_idx) AS idx FROM scored GROUP BY run, iteration ORDER BY run, iteration",
               "--lake", f"file://{lake}", "--format", "csv")
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    got = pl.read_csv(proc.stdout.encode())
    assert got.select("run", "iteration").rows() == [("q", 1), ("q", 2), ("q2", 1)]
    for row in got.iter_rows(named=True):
        scored = read_stage(lake, row["run"], f"iteration={row['iteration']}/scored")
        assert sorted(json.loads(row["idx"])) == sorted(scored["sample_idx"].to_list())


def test_the_table_is_one_line_a_row_in_a_pipe_and_fits_a_terminal(lake):
    """Piped or written to a file, the printed table keeps each row and column name on one line (for ``less -S``,
    ``grep``); on a terminal it fits the terminal's width with whole columns, the first and the last, and ``…``
    for those between."""
    import fcntl
    import pty
    import struct
    import termios

    query = ("sql", "SELECT * FROM scored WHERE run = 'q' AND iteration = 1 LIMIT 3", "--lake", f"file://{lake}")
    proc = cli(*query)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    columns = [*read_stage(lake, "q", "iteration=1/scored").columns, "run", "iteration", "step"]
    assert [c.strip() for c in lines[1].strip("│").split("┆")] == columns, lines[1]
    assert len([line for line in lines if line.startswith("│ ") and "┆ q " in line]) == 3, proc.stdout
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        on_tty = subprocess.run([sys.executable, "-m", "flows.cli", *query], stdout=follower, stderr=subprocess.PIPE, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(ROOT)} | {"COLUMNS": ""})
        os.close(follower)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the closed follower is drained
            while chunk := os.read(leader, 65536):
                shown += chunk
    finally:
        os.close(leader)
    assert on_tty.returncode == 0, on_tty.stderr
    table = shown.decode().splitlines()
    assert len(table) == 9 and max(map(len, table)) <= 80, shown.decode()  # borders, names, types, 3 rows
    names = [c.strip() for c in table[1].strip("│").split("┆")]
    k = names.index("…")
    assert 4 <= len(names) - 1 < len(columns) and names[:k] + names[k + 1 :] == columns[:k] + columns[k - len(names) + 1 :], names


def test_each_table_prefix_holds_only_its_parquet(lake):
    for table in TABLES:
        files = [p for p in (lake / table).rglob("*") if p.is_file()]
        assert files or table in ("pairs", "groups", "updates"), table  # ReST runs make no pairs, nor GRPO's tables
        assert all(p.suffix == ".parquet" and p.name.startswith("part-") for p in files), table
        assert all(p.relative_to(lake / table).parts[0].startswith("run=") for p in files), table
    assert not any(p.suffix == ".parquet" for p in (lake / "models").rglob("*"))  # and no table holds a model


def test_pyarrow_reads_one_table_prefix_across_runs_and_iterations(lake):
    dataset = ds.dataset(str(lake / "scored"), format="parquet", partitioning="hive")
    frame = pl.from_arrow(dataset.to_table())
    counts = frame.group_by("run", "iteration").len().sort("run", "iteration").rows()
    assert counts == [(r, g, read_stage(lake, r, f"iteration={g}/scored").height) for r, g in (("q", 1), ("q", 2), ("q2", 1))]
    # A filter on the partition columns prunes to one run's iteration.
    pruned = dataset.to_table(filter=(ds.field("run") == "q") & (ds.field("iteration") == 2))
    assert pl.from_arrow(pruned).drop("run", "iteration").equals(read_stage(lake, "q", "iteration=2/scored"))
    # The same with polars' own glob, and the filter table with its step partition.
    kept = pl.scan_parquet(str(lake / "filtered" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert sorted(kept.select("run", "iteration", "step").unique().rows()) == [("q", 1, 1), ("q", 2, 1), ("q2", 1, 1)]


def test_duckdb_answers_the_same_as_polars_and_flywheel_sql(lake):
    import duckdb

    question = "SELECT run, iteration, avg(reward) AS reward, count(*) AS n FROM {scored} GROUP BY ALL ORDER BY ALL"
    scored = f"read_parquet('{lake}/scored/**/*.parquet', hive_partitioning = true)"
    by_duckdb = duckdb.sql(question.format(scored=scored)).pl()
    by_polars = (
        pl.scan_parquet(str(lake / "scored" / "**" / "*.parquet"), hive_partitioning=True)
        .group_by("run", "iteration").agg(reward=pl.col("reward").mean(), n=pl.len()).sort("run", "iteration").collect()
    )
    proc = cli("sql", question.format(scored="scored"), "--lake", f"file://{lake}", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    by_flywheel = pl.DataFrame(json.loads(proc.stdout))
    assert by_duckdb.height == by_polars.height == by_flywheel.height == 3
    for other in (by_polars, by_flywheel):
        assert by_duckdb.select("run", "iteration", "n").rows() == other.select("run", "iteration", "n").rows()
        assert by_duckdb["reward"].to_list() == pytest.approx(other["reward"].to_list(), abs=1e-12)


def test_runs_lists_status_iterations_and_champion(lake):
    proc = cli("runs", "--lake", f"file://{lake}", "--json")
    assert proc.returncode == 0, proc.stderr
    run, other = json.loads(proc.stdout)
    assert other["run"] == "q2" and other["status"] == "finished" and other["iterations"] == 1
    summary = json.loads((lake / "runs" / "q" / "summary.json").read_text())
    assert run["run"] == "q" and run["status"] == "finished" and run["iterations"] == 2
    assert run["champion"] == f"{summary['champion']['model_name']} v{summary['champion']['version']}"
    assert run["best_reward"] == max(r["eval_reward"] for r in [summary["baseline"], *summary["iterations"]])
    assert run["started"]
    # As a table: one row a run, in line, with the run's best held-out reward beside the champion's.
    table = cli("runs", "--lake", f"file://{lake}").stdout.splitlines()
    assert [line.split()[0] for line in table] == ["run", "q", "q2"] and len({line.index(" finished ") for line in table[1:]}) == 1
    assert table[1].split()[4] == f"{run['best_reward']:.3f}", table


def test_a_bad_query_is_one_sentence(lake):
    proc = cli("sql", "SELECT nope FROM scored", "--lake", f"file://{lake}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("flywheel:")]
    assert "nope" in line and "scored" in line and "drops" in line
