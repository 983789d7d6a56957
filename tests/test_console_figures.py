"""What the console says about a run's figures, through the real ``flywheel run`` in a subprocess.

- A run whose completions are cut at ``max_new_tokens`` says so: one warning line for Grow and one for
  each evaluation, naming the share, the setting and its value; a run that is not cut prints no warning.
- Figures are rounded for people (tau, rewards: 3 significant digits; seconds: at most 4), while the
  lake keeps every digit.
- Labelled demonstrations without a reference are said to be unscored, not given a mean reward of 0.

Both runs use the session's Prefect server (tests/prefect_fixtures.py), so neither waits for an embedded one.

Run: ``.venv/bin/python -m pytest tests/test_console_figures.py -q``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.lake import Lake
from tests.flywheel_helpers import FAST, RECIPE

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
STAGE_SECONDS = re.compile(r" · (\d+(?:\.\d)?) s$")
ROWS = [{"prompt": f"{a}+{b}=", "reference": str(a + b)} for a in range(10) for b in range(6)]


def _run(cwd: Path, run: str, api: str, *sets: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    argv = [FLYWHEEL, "run", str(RECIPE), "--run-name", run, "--set", f"mlflow.tracking_uri=sqlite:///{cwd / 'mlflow.db'}"]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.run(argv, cwd=cwd, env=env | {"OMP_NUM_THREADS": "1", "PREFECT_API_URL": api},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def cut(tmp_path_factory, prefect_server) -> tuple[Path, list[str]]:
    """A user's task (labelled demonstrations without references), warm-started until the model answers
    with a number and an end token, grown and evaluated with ``max_new_tokens: 1``: no answer fits."""
    cwd = tmp_path_factory.mktemp("cut")
    (cwd / "data").mkdir()
    (cwd / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (cwd / "data" / "labelled.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["reference"]}) + "\n"
                                                         for r in ROWS))
    sets = ["task.builtin=null", "task.prompts=data/prompts.jsonl", "task.eval=data/prompts.jsonl",
            "task.labelled=data/labelled.jsonl", "warm_start.epochs=25", "grow_steps=1", "grow.samples_per_prompt=2",
            "grow.max_new_tokens=1", "eval.max_new_tokens=1", "improve.epochs=1"]
    proc = _run(cwd, "cut", prefect_server, *sets)
    return cwd, proc.stdout.splitlines()


@pytest.fixture(scope="module")
def whole(tmp_path_factory, prefect_server) -> tuple[Path, list[str]]:
    """The demo's task, warm-started until it ends its answers, with room for them: nothing is cut."""
    cwd = tmp_path_factory.mktemp("whole")
    proc = _run(cwd, "whole", prefect_server, *FAST, "grow_steps=1")
    return cwd, proc.stdout.splitlines()


def test_a_run_cut_at_max_new_tokens_says_so_for_grow_and_each_evaluation(cut):
    """The baseline's evaluation, Grow and the step's evaluation each say so once, with the share the lake records."""
    cwd, lines = cut
    summary = json.loads((cwd / "lake" / "runs" / "cut" / "summary.json").read_text())
    step = summary["iterations"][0]
    shares = [summary["baseline"]["eval_truncated"], step["grown_truncated"], step["eval_truncated"]]
    assert all(share > 0.05 for share in shares), summary

    def held_out(where: str, share: float) -> str:
        return (f"warning: eval {where}: {100 * share:.3g}% of held-out completions stopped at eval.max_new_tokens=1; "
                "raise it if answers are cut")

    assert [line for line in lines if line.startswith("warning:")] == [
        held_out("g=0 step 0", shares[0]),
        f"warning: grow g=1: {100 * shares[1]:.3g}% of samples stopped at grow.max_new_tokens=1; raise it if answers are cut",
        held_out("g=1 step 1", shares[2]),
    ], lines


def test_unscored_demonstrations_are_said_to_be_unscored(cut):
    cwd, lines = cut
    score = [line for line in lines if line.startswith("score g=1 part")]
    assert any(re.match(r"score g=1 part \S+: 60 labelled demonstrations, not scored \(no reference\) · ", line) for line in score), lines
    assert not any("mean reward 0.000" in line for line in score), lines
    lake = Lake(f"file://{cwd / 'lake'}")
    scored = lake.read(lake.stage_uri("cut", 1, "scored"))
    assert scored.filter(scored["sample_idx"] < 0)["reward"].null_count() == 60  # the lake keeps them null


def test_a_run_that_is_not_cut_prints_no_warning(whole):
    cwd, lines = whole
    assert [line for line in lines if "warning" in line.lower()] == [], lines
    summary = json.loads((cwd / "lake" / "runs" / "whole" / "summary.json").read_text())
    assert summary["iterations"][0]["grown_truncated"] <= 0.05 and summary["baseline"]["eval_truncated"] <= 0.05


def _significant(text: str) -> int:
    return len(text.replace("-", "").replace(".", "").lstrip("0"))


def test_figures_are_rounded_on_the_console_and_whole_in_the_lake(whole):
    cwd, lines = whole
    summary = json.loads((cwd / "lake" / "runs" / "whole" / "summary.json").read_text())
    tau = summary["iterations"][0]["tau"]
    [line] = [line for line in lines if line.startswith("filter g=1 step 1:")]
    shown = re.search(r"tau=(\S+)", line)[1]
    assert _significant(shown) <= 3 and float(shown) == pytest.approx(tau, abs=5e-3 * abs(tau) + 1e-12), line
    rewards = [m[1] for line in lines for m in [re.search(r"(?:mean )?reward (\d\S*?)[,) ]", line + " ")] if m]
    assert rewards and all(_significant(r) <= 3 for r in rewards), lines
    seconds = [STAGE_SECONDS.search(line)[1] for line in lines if STAGE_SECONDS.search(line)]
    assert seconds and all(_significant(s) <= 4 for s in seconds), lines
    lake = Lake(f"file://{cwd / 'lake'}")
    assert lake.manifest_doc(lake.stage_uri("whole", 1, "filtered", 1))["config"]["tau"] == tau  # every digit
