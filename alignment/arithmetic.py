"""The built-in task: two-number addition, "b+a=" -> "b+a" as digits, checked by exact match.

Small enough to learn on two CPU cores in seconds and verifiable exactly, so the effect of
each Grow/Improve step on held-out accuracy is visible. All examples come from one seeded
shuffle of every (b, a) pair, split into disjoint labelled (warm start), grow and eval sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class TaskData:
    """A task's three tables: ``prompts`` and ``eval`` (prompt_id, prompt, reference), ``labelled`` (+ completion)."""

    prompts: pl.DataFrame
    eval: pl.DataFrame
    labelled: pl.DataFrame


def arithmetic_task(
    *, max_a: int = 100, max_b: int = 10, n_labelled: int = 200, n_prompts: int = 600, n_eval: int = 200, seed: int = 0
) -> TaskData:
    """Make the addition task: ``a < max_a``, ``b < max_b``, prompts like ``"37+5="``, answers like ``"42"``."""
    pairs = [(a, b) for a in range(max_a) for b in range(max_b)]
    need = n_labelled + n_prompts + n_eval
    if need > len(pairs):
        raise ValueError(
            f"The arithmetic task has only {len(pairs)} distinct problems but {need} were asked for; "
            "lower task.n_labelled/n_prompts/n_eval or raise task.max_a/max_b."
        )
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "reference": str(a + b)} for a, b in pairs[:need]]
    frame = pl.DataFrame(rows).with_row_index("prompt_id").with_columns(pl.col("prompt_id").cast(pl.Int64))
    labelled = frame.slice(0, n_labelled).with_columns(pl.col("reference").alias("completion"))
    return TaskData(
        labelled=labelled,
        prompts=frame.slice(n_labelled, n_prompts),
        eval=frame.slice(n_labelled + n_prompts, n_eval),
    )
