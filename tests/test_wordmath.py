"""The built-in word-problem task and its recipe: GSM8K-style problems generated locally, a tiny Llama
with a byte-level BPE tokenizer and ChatML, scored by ``numeric_match``.

Run: ``.venv/bin/python -m pytest tests/test_wordmath.py -q`` (``-m slow`` for the full recipe, ~5 min).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.prompting import Formatter
from alignment.rewards import numeric_match
from alignment.tokenizer import IM_END, build_bpe_tokenizer
from alignment.wordmath import wordmath_task

ROOT = Path(__file__).resolve().parents[1]


def test_problems_are_distinct_splits_disjoint_and_worked_answers_score_one():
    task = wordmath_task(n_labelled=50, n_prompts=80, n_eval=40, seed=3)
    prompts = [*task.labelled["prompt"], *task.prompts["prompt"], *task.eval["prompt"]]
    assert len(prompts) == len(set(prompts)) == 170
    assert numeric_match(task.labelled["prompt"], task.labelled["completion"], task.labelled["reference"]) == [1.0] * 50
    assert all(c.endswith(f"The answer is {r}.") for c, r in zip(task.labelled["completion"], task.labelled["reference"]))
    assert wordmath_task(n_labelled=50, n_prompts=80, n_eval=40, seed=3).eval.equals(task.eval)


def test_the_bpe_chat_tokenizer_round_trips_and_ends_turns_with_im_end():
    task = wordmath_task(n_labelled=20, n_prompts=20, n_eval=20)
    tok = build_bpe_tokenizer([*task.prompts["prompt"], *task.labelled["completion"]], vocab_size=400)
    text = "Nina has 1,234 apples — and 7 more."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert [tok.decode([t]) for t in tok("1234", add_special_tokens=False)["input_ids"]] == ["1", "2", "3", "4"]
    f = Formatter(tok)
    ids, labels = f.example("What is 2 plus 3?", "5")
    assert f.chat and tok.decode([t for t in labels if t != -100]) == "5" + IM_END
    assert tok.pad_token_id not in f.end_ids and tok.eos_token_id in f.end_ids


@pytest.mark.slow
def test_the_wordmath_recipe_raises_held_out_reward(tmp_path):
    argv = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "recipes" / "wordmath-rest.yaml"), "--run-name", "wm",
            "--set", f"lake=file://{tmp_path / 'lake'}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    proc = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "lake" / "runs" / "wm" / "summary.json").read_text())
    assert summary["champion"]["eval_reward"] > summary["baseline"]["eval_reward"] + 0.03, summary
