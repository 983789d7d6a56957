"""Bad input to every command besides ``run``: ``sql``, ``runs``, ``report``, ``inspect``, ``stack`` and ``serve``.

Each case runs the installed ``flywheel`` command in a subprocess, as people meet it, and must exit with
code 2 and print exactly one ``flywheel:`` line on stderr (naming what was wrong) and no ``Traceback``:
a missing run, table, iteration or lake, an SQL error (the engine's own message, on one line), a lake
that cannot be reached, an output path that cannot be written, a bad option value, a broken stack
state file, a recipe that cannot be served, a Prefect server that is not there. Every one of them is
found before anything heavy loads, so the cases take a second or two each; they run two at a time.

The lake they read is written with the lake library itself (one committed stage per run), not by a run.

Run: ``.venv/bin/python -m pytest tests/test_bad_inputs_commands.py -q``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from tests.prefect_fixtures import free_port

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "arithmetic-rest.yaml")
CLOSED = free_port()  # bound and released: nothing listens there
CASE_TIMEOUT_S = 60
S3_DOWN = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{CLOSED}", "AWS_ACCESS_KEY_ID": "flywheel", "AWS_SECRET_ACCESS_KEY": "flywheel"}
NO_KEYS = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{CLOSED}", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "AWS_CONFIG_FILE": "/nonexistent"}


@dataclass
class Case:
    id: str
    argv: list[str]  # after `flywheel`; {lake}, {damaged}, {base}, {taken}, {free} are filled in
    expect: list[str] = field(default_factory=list)  # substrings of the flywheel: line
    cwd: str = "work"  # work (holds lake/), empty, or broken (a stack state file that is not JSON)
    env: dict[str, str] = field(default_factory=dict)


def _lake(*argv: str) -> list[str]:
    return [*argv, "--lake", "file://{lake}"]


CASES = [
    # -- sql ---------------------------------------------------------------------------------------
    Case("sql-missing-table", _lake("sql", "SELECT * FROM scored"), ["relation 'scored' was not found", "prompts"]),
    Case("sql-unknown-column", _lake("sql", "SELECT nope FROM prompts"), ['"nope"', "ColumnNotFoundError"]),
    Case("sql-syntax", _lake("sql", "SELEC 1"), ["sql parser error", "SELEC"]),
    Case("sql-types", _lake("sql", "SELECT prompt + 1 FROM prompts"), ["InvalidOperationError", "prompt"]),
    Case("sql-empty", _lake("sql", " "), ["The query is empty"]),
    Case("sql-two-statements", _lake("sql", "SELECT 1; SELECT 2"), ["one (and only one) statement"]),
    Case("sql-default-lake-missing", ["sql", "SELECT 1"], ["No lake at file://", "does not exist", "--lake"], cwd="empty"),
    Case("sql-not-a-lake", ["sql", "SELECT 1", "--lake", "file://{base}/empty"], ["holds no runs/"]),
    Case("sql-lake-is-a-file", ["sql", "SELECT 1", "--lake", "file://{lake}/runs/r/run.json"], ["is not a folder"]),
    Case("sql-lake-scheme", ["sql", "SELECT 1", "--lake", "gs://bucket/lake"], ["gs://bucket/lake"]),
    Case("sql-lake-no-bucket", ["sql", "SELECT 1", "--lake", "s3://"], ["names no bucket"]),
    Case("sql-s3-down", ["sql", "SELECT 1", "--lake", "s3://lake/x"], [f"127.0.0.1:{CLOSED}", "is the server running"], env=S3_DOWN),
    Case("sql-s3-no-credentials", ["sql", "SELECT 1", "--lake", "s3://lake/x"], ["No AWS credentials"], env=NO_KEYS),
    Case("sql-format", _lake("sql", "SELECT 1", "--format", "xml"), ["--format", "'xml'", "flywheel sql --help"]),
    Case("sql-out-folder", _lake("sql", "SELECT 1", "--out", "{base}"), ["is a folder"]),
    Case("sql-out-unwritable", _lake("sql", "SELECT 1", "--out", "/proc/flywheel/out.csv"), ["/proc/flywheel/out.csv", "cannot be written"]),
    # -- runs --------------------------------------------------------------------------------------
    Case("runs-lake-missing", ["runs", "--lake", "file://{base}/nowhere"], ["No lake at", "does not exist"]),
    Case("runs-lake-scheme", ["runs", "--lake", "ftp://host/lake"], ["ftp://host/lake"]),
    Case("runs-s3-down", ["runs", "--lake", "s3://lake/x"], [f"127.0.0.1:{CLOSED}"], env=S3_DOWN),
    Case("runs-unknown-option", ["runs", "--all"], ["unrecognized arguments: --all"]),
    # -- report ------------------------------------------------------------------------------------
    Case("report-missing-run", _lake("report", "nope"), ["No run 'nope'", "flywheel runs"]),
    Case("report-no-summary", _lake("report", "r"), ["Run 'r'", "no summary"]),
    Case("report-bad-summary", _lake("report", "bad"), ["summary.json is not valid JSON"]),
    Case("report-run-name", _lake("report", "../r"), ["'..'"]),
    Case("report-lake-missing", ["report", "r", "--lake", "file://{base}/nowhere"], ["No lake at"]),
    Case("report-out-folder", _lake("report", "r", "--out", "{base}"), ["is a folder"]),
    Case("report-out-unwritable", _lake("report", "r", "--out", "/proc/flywheel/r.html"), ["cannot be written"]),
    Case("report-s3-down", ["report", "r", "--lake", "s3://lake/x"], [f"127.0.0.1:{CLOSED}"], env=S3_DOWN),
    # -- inspect -----------------------------------------------------------------------------------
    Case("inspect-lake-missing", ["inspect", "file://{base}/nowhere"], ["Nothing committed under"]),
    Case("inspect-missing-run", ["inspect", "file://{lake}/runs/nope"], ["Nothing committed under", "runs/nope"]),
    Case("inspect-missing-table", ["inspect", "file://{lake}/scored"], ["Nothing committed under", "/scored"]),
    Case("inspect-missing-iteration", ["inspect", "file://{lake}/prompts/run=r/iteration=9"], ["iteration=9"]),
    Case("inspect-scheme", ["inspect", "gs://bucket/lake"], ["gs://bucket/lake"]),
    Case("inspect-limit", ["inspect", "file://{lake}/runs/r", "--limit", "-1"], ["--limit", "'-1'"]),
    Case("inspect-damaged-part", ["inspect", "file://{damaged}/runs/r"], ["part-00000.parquet", "delete"]),
    Case("inspect-s3-down", ["inspect", "s3://lake/x/runs/r"], [f"127.0.0.1:{CLOSED}"], env=S3_DOWN),
    # -- stack -------------------------------------------------------------------------------------
    Case("stack-action", ["stack", "restart"], ["invalid choice: 'restart'"], cwd="empty"),
    Case("stack-port-zero", ["stack", "up", "--s3-port", "0"], ["--s3-port", "from 1 to 65535"], cwd="empty"),
    Case("stack-port-word", ["stack", "up", "--mlflow-port", "http"], ["--mlflow-port", "'http'"], cwd="empty"),
    Case("stack-timeout", ["stack", "up", "--timeout", "-5"], ["--timeout", "> 0"], cwd="empty"),
    Case("stack-same-port", ["stack", "up", "--s3-port", "{free}", "--mlflow-port", "{free}"], ["is given to s3 and mlflow"],
         cwd="empty"),
    Case("stack-port-taken", ["stack", "up", "--s3-port", "{taken}"], ["Port {taken} for s3 is taken", "--s3-port"], cwd="empty"),
    Case("stack-state-status", ["stack", "status"], ["state.json cannot be read", "delete"], cwd="broken"),
    Case("stack-state-down", ["stack", "down"], ["state.json cannot be read"], cwd="broken"),
    # -- serve -------------------------------------------------------------------------------------
    Case("serve-recipe-missing", ["serve", "nope.yaml"], ["nope.yaml", "does not exist"]),
    Case("serve-recipe-folder", ["serve", "{base}"], ["is a folder"]),
    Case("serve-recipe-not-yaml", ["serve", "{base}/broken.yaml"], ["not valid YAML"]),
    Case("serve-override-form", ["serve", RECIPE, "--set", "grow.samples_per_prompt"], ["dotted.key=value"]),
    Case("serve-limit", ["serve", RECIPE, "--limit", "0"], ["--limit", ">= 1"]),
    Case("serve-same-name", ["serve", RECIPE, RECIPE], ["named 'arithmetic-rest'", "unique"]),
    Case("serve-bad-cron", ["serve", RECIPE, "--set", "orchestration.schedule=at dawn"], ["'at dawn'", "cron"]),
    Case("serve-no-recipes", ["serve"], ["No recipes to serve"], cwd="empty"),
    Case("serve-no-server", ["serve", RECIPE], ["needs a Prefect server", "flywheel stack up"], cwd="empty"),
    Case("serve-server-down", ["serve", RECIPE], [f"PREFECT_API_URL=http://127.0.0.1:{CLOSED}/api", "does not answer"],
         env={"PREFECT_API_URL": f"http://127.0.0.1:{CLOSED}/api"}),
    Case("serve-stack-state", ["serve", RECIPE], ["state.json cannot be read"], cwd="broken"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A lake of three runs (``r`` with a committed stage and no summary, ``bad`` whose summary is not JSON),
    a lake whose one part is truncated, an empty folder, a stack folder with a broken state file, a broken recipe."""
    from tasks.lake import Lake

    base = tmp_path_factory.mktemp("bad-commands")
    frame = pl.DataFrame({"prompt_id": [0, 1, 2], "prompt": ["1+1=", "2+2=", "3+3="], "reference": ["2", "4", "6"]})
    for name in ("lake", "damaged"):
        lake = Lake(f"file://{base / 'work' / name}")
        for run in ("r", "bad"):
            lake.write_stage(lake.stage_uri(run, 0, "prompts"), [frame], config={"rows": 3})
        lake.put_json(f"{lake.run_uri('r')}/run.json", {"run": "r"})
    (base / "work" / "lake" / "runs" / "bad" / "summary.json").write_text('{"run": "bad", ')
    part = next((base / "work" / "damaged" / "prompts" / "run=r").rglob("part-00000.parquet"))
    part.write_bytes(part.read_bytes()[:40])
    (base / "empty").mkdir()
    (base / "broken" / ".flywheel" / "stack").mkdir(parents=True)
    (base / "broken" / ".flywheel" / "stack" / "state.json").write_text('{"s3": {"pid": ')
    (base / "broken.yaml").write_text("name: [unclosed\n")
    return base


def _env(base: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_"))}
    return env | {"OMP_NUM_THREADS": "1", "PREFECT_HOME": str(base / "prefect")} | extra


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    seconds: float


def _run(case: Case, base: Path, ports: dict[str, int]) -> Result:
    fill = {"lake": base / "work" / "lake", "damaged": base / "work" / "damaged", "base": base, **ports}
    argv = [FLYWHEEL, *(a.format(**fill) for a in case.argv)]
    cwd = base / case.cwd
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=cwd, env=_env(base, case.env), capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -1, str(exc.stdout or ""), f"timed out after {CASE_TIMEOUT_S} s\n{exc.stderr or ''}"
    return Result(rc, out, err, time.monotonic() - start)


@pytest.fixture(scope="module")
def results(request, base) -> dict[str, Result]:
    """Run every selected case, two at a time, before the first assertion; one port is held by a listener."""
    selected = [
        item.callspec.params["case"] for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {"taken": taken.getsockname()[1], "free": free_port()}
        with ThreadPoolExecutor(2) as pool:
            found = dict(zip([c.id for c in selected], pool.map(lambda c: _run(c, base, ports), selected), strict=True))
    return {k: (r, ports) for k, r in found.items()}


def test_there_are_at_least_30_cases_over_every_command():
    assert len({c.id for c in CASES}) == len(CASES) >= 30
    assert {c.argv[0] for c in CASES} == {"sql", "runs", "report", "inspect", "stack", "serve"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_sentence_and_exit_2(results, case):
    r, ports = results[case.id]
    said = f"exit {r.rc} after {r.seconds:.1f} s\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert r.rc == 2, said
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("flywheel: "), said
    assert "Traceback" not in r.stdout + r.stderr, said
    for text in case.expect:
        assert text.format(**ports) in lines[0], lines[0]


def test_a_good_query_on_the_same_lake_answers(base):
    """The lake the cases read is a lake: the same commands answer when asked properly."""
    lake = f"file://{base / 'work' / 'lake'}"
    proc = subprocess.run([FLYWHEEL, "sql", "SELECT run, count(*) AS n FROM prompts GROUP BY run ORDER BY run", "--lake", lake,
                           "--format", "json"], cwd=base, env=_env(base, {}), capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"run": "bad", "n": 3}, {"run": "r", "n": 3}]


def test_parquet_to_a_terminal_is_refused_and_to_a_pipe_is_written(base):
    """``--format parquet`` without ``--out`` would print binary on a terminal: one sentence instead; piped, it is the file."""
    import pty

    lake = f"file://{base / 'work' / 'lake'}"
    argv = [FLYWHEEL, "sql", "SELECT run FROM prompts", "--lake", lake, "--format", "parquet"]
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(argv, cwd=base, env=_env(base, {}), stdout=follower, stderr=subprocess.PIPE, text=True,
                              timeout=CASE_TIMEOUT_S)
        os.close(follower)
        shown = b""
        while True:  # what reached the terminal (EIO once the follower is closed and drained)
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--out" in lines[0] and lines[0].startswith("flywheel: "), proc.stderr
    assert b"PAR1" not in shown
    piped = subprocess.run(argv, cwd=base, env=_env(base, {}), capture_output=True, timeout=CASE_TIMEOUT_S)
    assert piped.returncode == 0, piped.stderr
    assert pl.read_parquet(piped.stdout)["run"].sort().to_list() == ["bad"] * 3 + ["r"] * 3
