"""A task's tables: the built-in tasks, or a user's prompt, held-out and labelled files, checked.

Bad input is caught here, before anything is written: a missing file, a missing column, an empty
table, or rows whose prompt or reference is null, empty, a list or a repeated id: each is one
sentence naming the file (and the column, how many rows and the first of them) and what to do.
Nothing here imports Prefect or a model library, so ``flywheel run`` checks the files first.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from alignment.arithmetic import TaskData, arithmetic_task
from alignment.errors import UserError
from alignment.recipe import TaskConfig

PROMPT_SCHEMA = {"prompt_id": pl.Int64, "prompt": pl.Utf8, "reference": pl.Utf8}


class InputError(UserError):
    """A prompt or labelled-data file is missing, unreadable or lacks a needed column."""


# Where a column holds something other than text: {column: (type name, how many rows, first row from 1)}.
NonText = dict[str, tuple[str, int, int]]
NUMBER_TYPES = ("int", "float", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float32", "Float64")


def _read_table(path: str, what: str) -> tuple[pl.DataFrame, NonText]:
    """The file's rows as text columns, and where a column held something else (a list, a number, a boolean)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"The {what} file {path} does not exist; fix task.{what} in the recipe or pass --set task.{what}=PATH.")
    if p.suffix in (".jsonl", ".ndjson", ".json"):
        frame, non_text = _read_jsonl(p, what)
    elif p.suffix == ".parquet":
        try:
            frame = pl.read_parquet(p)
        except Exception as exc:
            raise InputError(f"Could not read the {what} file {path} ({type(exc).__name__}: {_one_line(str(exc))}).") from exc
        non_text = {
            c: (str(frame[c].dtype), int(frame[c].is_not_null().sum()), int(frame[c].is_not_null().arg_true()[0]) + 1)
            for c in frame.columns if frame[c].dtype not in (pl.Utf8, pl.Null) and frame[c].is_not_null().any()
        }
    else:
        raise InputError(f"The {what} file {path} must be JSONL (.jsonl) or Parquet (.parquet).")
    if frame.height == 0:
        raise InputError(f"The {what} file {path} has no rows; it needs at least one prompt.")
    return frame, non_text


def _read_jsonl(p: Path, what: str) -> tuple[pl.DataFrame, NonText]:
    """JSON lines read row by row: polars would turn a list or a number in a text column into text silently."""
    rows = []
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Could not read the {what} file {p} ({type(exc).__name__}: {_one_line(str(exc))}).") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"The {what} file {p} is not JSON lines: line {number} is not valid JSON ({exc.msg}).") from None
        if not isinstance(row, dict):
            raise InputError(f"The {what} file {p} is not JSON lines: line {number} is not a JSON object of columns.")
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    non_text: NonText = {}
    for c in columns:
        wrong = [(i, type(row[c]).__name__) for i, row in enumerate(rows) if c in row and not isinstance(row[c], str | None)]
        if wrong:
            non_text[c] = (wrong[0][1], len(wrong), wrong[0][0] + 1)
    data = {c: [_text(row.get(c)) for row in rows] for c in columns}
    return pl.DataFrame(data, schema=dict.fromkeys(columns, pl.Utf8)), non_text


def _text(value: object) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _columns(table: tuple[pl.DataFrame, NonText], path: str, what: str, need: dict[str, str]) -> pl.DataFrame:
    """Rename the recipe's columns to ours after checking their rows; each problem is one sentence naming
    the file, the column, how many rows and the first of them (rows count from 1)."""
    frame, non_text = table
    missing = [src for src in need.values() if src not in frame.columns]
    if missing:
        raise InputError(
            f"The {what} file {path} has no column {missing[0]!r} (columns: {', '.join(frame.columns)}); "
            f"rename it or set task.{_setting(need, missing[0], what)}."
        )
    for dst, src in need.items():
        kind = non_text.get(src)
        if kind and (dst != "reference" or kind[0] not in NUMBER_TYPES):  # a numeric reference is read as its text
            _bad_rows(what, path, src, kind[1], kind[2], f"hold a {kind[0]} instead of text")
        nulls = frame[src].is_null()
        if nulls.any():
            _bad_rows(what, path, src, int(nulls.sum()), int(nulls.arg_true()[0]) + 1, "are null or missing")
    empty = frame[need["prompt"]].str.strip_chars() == ""
    if empty.any():
        _bad_rows(what, path, need["prompt"], int(empty.sum()), int(empty.arg_true()[0]) + 1, "are empty")
    for ids in (c for c in ("prompt_id", "id") if c in frame.columns):
        dup = ~frame[ids].is_first_distinct() & frame[ids].is_not_null()
        if dup.any():
            _bad_rows(what, path, ids, int(dup.sum()), int(dup.arg_true()[0]) + 1, "repeat an earlier row's id")
    out = frame.select([pl.col(src).cast(pl.Utf8).alias(dst) for dst, src in need.items()])
    return out.with_row_index("prompt_id").with_columns(pl.col("prompt_id").cast(pl.Int64))


def _bad_rows(what: str, path: str, column: str, count: int, first: int, problem: str) -> None:
    raise InputError(
        f"The {what} file {path} has {count} row(s) whose {column!r} values {problem} (the first is row {first}); "
        "fix or drop those rows."
    )


def _setting(need: dict[str, str], column: str, what: str) -> str:
    role = next(dst for dst, src in need.items() if src == column)
    return "labelled_reference_column" if (what == "labelled" and role == "reference") else f"{role}_column"


def load_task(cfg: TaskConfig, seed: int) -> TaskData:
    """Read (or build) the task's tables and check them."""
    if cfg.builtin == "arithmetic" and not cfg.prompts:
        return arithmetic_task(n_labelled=cfg.n_labelled, n_prompts=cfg.n_prompts, n_eval=cfg.n_eval, seed=seed)
    if cfg.builtin == "wordmath" and not cfg.prompts:
        from alignment.wordmath import wordmath_task

        return wordmath_task(n_labelled=cfg.n_labelled, n_prompts=cfg.n_prompts, n_eval=cfg.n_eval, seed=seed)
    cols = {"prompt": cfg.prompt_column, "reference": cfg.reference_column}
    prompts = _columns(_read_table(cfg.prompts, "prompts"), cfg.prompts, "prompts", cols)
    evals = _columns(_read_table(cfg.eval, "eval"), cfg.eval, "eval", cols)
    if cfg.labelled:
        labelled_cols = {"prompt": cfg.prompt_column, "completion": cfg.completion_column}
        if cfg.labelled_reference_column:
            labelled_cols["reference"] = cfg.labelled_reference_column
        labelled = _columns(_read_table(cfg.labelled, "labelled"), cfg.labelled, "labelled", labelled_cols)
        if not cfg.labelled_reference_column:
            # Demonstrations: their completion is not a reference, so the reward never sees them (reward null).
            labelled = labelled.with_columns(pl.lit(None, pl.Utf8).alias("reference"))
    else:
        labelled = pl.DataFrame(schema={**PROMPT_SCHEMA, "completion": pl.Utf8})
    # Eval prompts get ids after the training prompts so a prompt_id names one prompt per run.
    evals = evals.with_columns(pl.col("prompt_id") + prompts.height)
    labelled = labelled.with_columns(pl.col("prompt_id") + prompts.height + evals.height)
    return TaskData(prompts=prompts, eval=evals, labelled=labelled)
