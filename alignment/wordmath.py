"""A built-in word-problem task in the style of GSM8K, generated locally: one or two arithmetic steps
told as a short story, answered with worked steps and a final number ("... The answer is 17.").

Scored with ``numeric_match`` (the last number of the completion against the reference), so a
completion may reason in any words as long as its final number is right — the reward shape of
real math tasks. Labelled completions show the working, so the warm start learns the format and
ReST learns the arithmetic. All problems come from one seeded generator and the labelled, grow and
eval splits are disjoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import polars as pl

from alignment.arithmetic import TaskData

NAMES = ["Nina", "Omar", "Lena", "Ravi", "Maya", "Tom", "Ada", "Ben", "Iris", "Yuki"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "shells", "cards"]

# Each template draws its numbers and returns (question, worked answer, final number).
Problem = Callable[[random.Random], tuple[str, str, int]]


def _gain(rng: random.Random) -> tuple[str, str, int]:
    name, thing, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 30), rng.randint(2, 20)
    q = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?"
    return q, f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b


def _loss(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    b = rng.randint(2, 20)
    a = rng.randint(b + 1, b + 30)
    q = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
    return q, f"{a} - {b} = {a - b}. The answer is {a - b}.", a - b


def _groups(rng: random.Random) -> tuple[str, str, int]:
    name, thing, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} does {name} buy?"
    return q, f"{a} * {b} = {a * b}. The answer is {a * b}.", a * b


def _two_steps(rng: random.Random) -> tuple[str, str, int]:
    name, other, thing = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(5, 30), rng.randint(2, 15)
    c = rng.randint(1, a + b - 1)
    q = f"{name} has {a} {thing} and finds {b} more, then gives {c} to {other}. How many {thing} does {name} keep?"
    return q, f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}. The answer is {a + b - c}.", a + b - c


PROBLEMS: tuple[Problem, ...] = (_gain, _loss, _groups, _two_steps)


def wordmath_task(*, n_labelled: int = 300, n_prompts: int = 600, n_eval: int = 200, seed: int = 0) -> TaskData:
    """Distinct word problems split into labelled (with worked answers), grow and eval tables."""
    rng = random.Random(seed)
    need = n_labelled + n_prompts + n_eval
    seen: dict[str, tuple[str, int]] = {}
    attempts = 0
    while len(seen) < need:
        attempts += 1
        if attempts > need * 50:
            raise ValueError(f"Could not draw {need} distinct word problems; lower task.n_labelled/n_prompts/n_eval.")
        question, worked, answer = PROBLEMS[len(seen) % len(PROBLEMS)](rng)
        seen.setdefault(question, (worked, answer))
    rows = [{"prompt": q, "reference": str(ans), "worked": w} for q, (w, ans) in seen.items()]
    rng.shuffle(rows)
    frame = pl.DataFrame(rows).with_row_index("prompt_id").with_columns(pl.col("prompt_id").cast(pl.Int64))
    labelled = frame.slice(0, n_labelled).rename({"worked": "completion"})
    return TaskData(
        labelled=labelled.select("prompt_id", "prompt", "reference", "completion"),
        prompts=frame.slice(n_labelled, n_prompts).select("prompt_id", "prompt", "reference"),
        eval=frame.slice(n_labelled + n_prompts, n_eval).select("prompt_id", "prompt", "reference"),
    )
