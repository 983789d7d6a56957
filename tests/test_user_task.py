"""A user's own task, configured only through the recipe: "reverse the letters", with prompts as
JSONL, labelled data as Parquet, renamed columns and a partial-credit reward from an import path.
The built-in task is switched off, and held-out reward must rise over the warm-started baseline
(the ``slow`` test checks it keeps rising over three Grow steps).

Run: ``.venv/bin/python -m pytest tests/test_user_task.py -q`` (``-m 'not slow'`` for the fast one).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import polars as pl
import pytest

from tests.flywheel_helpers import (
    flywheel,
    one_torch_thread,  # noqa: F401  (autouse: one intra-op thread for this module)
    read_stage,
    summary_of,
)

HERE = Path(__file__).resolve().parent


# -- the user's reward (found by import path "test_user_task:letters_matched") --------------------
def letters_matched(prompts, completions, references):
    """Partial credit: matching positions over the longer of completion and reference."""
    out = []
    for c, r in zip(completions, references, strict=True):
        c = c.strip()
        out.append(sum(a == b for a, b in zip(c, r)) / max(len(c), len(r), 1))
    return out


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
reward: test_user_task:letters_matched
warm_start:
  epochs: 6
  lr: 0.003
  batch_size: 16
grow:
  samples_per_prompt: 12
  max_new_tokens: 6          # four letters and the end-of-turn token, with one to spare
  include_labelled: false   # Improve learns from the policy's own samples only
improve:
  epochs: 4
  lr: 0.003
eval:
  max_new_tokens: 6
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
    evals = read_stage(workdir / "lake", "reverse", "iteration=0/eval/step=0")
    assert evals.height == sizes[2]
    # Partial credit: the baseline gets some letters right but not all.
    assert 0.0 < s["baseline"]["eval_reward"] < 1.0
    assert evals["reward"].n_unique() > 2
    scored = read_stage(workdir / "lake", "reverse", "iteration=1/scored")
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
