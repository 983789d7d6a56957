"""Bad input through the real CLI: each mistake exits with code 2 and one ``flywheel: ...`` sentence
that names what was wrong, is not retried, and leaves no partial stage behind and no model version
for the step that failed.

Covers a missing, column-less or empty prompt file, a model folder without ``config.json``, reward
functions that cannot be found or return the wrong number of values or NaN (before training and on
grown samples: that one, found once the run is working, exits with code 1 and says how to resume), and
recipes with an unknown key, a wrong type or a value that is not allowed.

Run: ``.venv/bin/python -m pytest tests/test_bad_input.py -q``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest

from tests.flywheel_helpers import (
    FAST,
    RECIPE,
    flywheel,
    one_torch_thread,  # noqa: F401  (autouse: one intra-op thread for this module)
    partial_stages,
    versions_of,
)

HERE = Path(__file__).resolve().parent


# -- helpers -----------------------------------------------------------------------------------
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


# -- user rewards (found by import path "test_bad_input:NAME") ------------------------------------
def wrong_length(prompts, completions, references):
    return [1.0] * (len(completions) - 1)


def nan_reward(prompts, completions, references):
    return [math.nan if i % 7 == 3 else 0.0 for i in range(len(completions))]


def nan_on_grown_samples(prompts, completions, references):
    """Fine on the 40 held-out prompts, NaN on the 240 grown samples: fails at Score, not at the baseline."""
    return [math.nan if len(completions) > 100 else 1.0 for _ in completions]


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
    assert not (workdir / "lake" / "eval" / "run=bad").exists()
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
        ("test_bad_input:no_such_function", ["no callable 'no_such_function'"]),
        ("test_bad_input:wrong_length", ["wrong_length returned 39 values for 40 completions"]),
        ("test_bad_input:nan_reward", ["nan_reward returned a non-finite value", "row(s): 3, 10, 17, 24, 31, 38"]),
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
    rc = flywheel(RECIPE, *QUICK, "reward=test_bad_input:nan_on_grown_samples", run="bad")
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]  # the run was working: exit 1, and the sentence says how to resume
    message = cli_error(err)
    assert message.startswith("run bad stopped in scoring (iteration 1): ") and "--run-name bad" in message, message
    assert "nan_on_grown_samples returned a non-finite value" in message and "for 240 row(s)" in message
    assert partial_stages(workdir / "lake") == []
    assert not (workdir / "lake" / "scored" / "run=bad" / "iteration=1").exists()
    assert [str(v.version) for v in versions_of(workdir)] == ["1"]  # the baseline, nothing for iteration 1
    assert not [r.getMessage() for r in caplog.records if "will start" in r.getMessage()]  # not retried


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["grow.samples=4"], "unknown key 'grow.samples'"),
        (["grow.samples_per_prompt=many"], "grow.samples_per_prompt: expected a whole number"),
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
