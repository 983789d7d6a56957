"""The run's inputs as iteration 0 of the lake: prompts, held-out prompts, labelled data, base model.

Bad input is caught here, before anything is written: a missing file, a missing column, an empty
table, or rows whose prompt or reference is null, empty, a list or a repeated id: each is one
sentence naming the file (and the column, how many rows and the first of them) and what to do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import polars as pl

from alignment.arithmetic import TaskData, arithmetic_task
from alignment.errors import UserError
from alignment.recipe import Recipe, TaskConfig
from tasks.context import RunRef, flywheel_task, log, retry_on_io

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


@flywheel_task(name="prepare-inputs", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=retry_on_io)
def prepare_inputs(ref: RunRef) -> dict[str, str]:
    """Write prompts, held-out prompts and labelled data to iteration 0, and the base model: their URIs.

    Every prompt is checked against the model's context (with room for ``max_new_tokens``) before
    anything is written, so a prompt file that cannot work leaves no dataset behind.
    """
    recipe: Recipe = ref.recipe
    lake = ref.open_lake()
    uris = {name: ref.stage(0, name) for name in ("prompts", "eval_prompts", "labelled")}
    base_uri = ref.stage(0, "base")
    if not all(lake.is_done(u) for u in uris.values()):
        data = load_task(recipe.task, recipe.seed_for("task"))
        with tempfile.TemporaryDirectory() as tmp:
            base_dir = recipe.model.path or _build_base(recipe, _texts([data.prompts, data.eval, data.labelled], recipe), tmp)
            check_lengths(recipe, base_dir, data)
            for name, frame in (("prompts", data.prompts), ("eval_prompts", data.eval), ("labelled", data.labelled)):
                lake.write_stage(uris[name], [frame], config=recipe.task.model_dump())
            if not recipe.model.path and not lake.is_done(base_uri):
                lake.put_dir(tmp, base_uri, extra={"kind": "base-model"})
        log().info("inputs: %d prompts, %d held-out, %d labelled", data.prompts.height, data.eval.height, data.labelled.height)
    uris["base"] = _base_model(ref, uris)
    return uris


def preflight(recipe: Recipe) -> None:
    """Check the task's files and the model against each other before a flow starts.

    The same checks ``prepare_inputs`` makes, run in the CLI's process so a bad prompt file, a model
    folder without weights or a prompt too long for the context is one sentence before Prefect
    starts, and nothing is written.
    """
    from alignment.reward_model import check_reward_spec
    from tasks.storage import check_writable

    check_writable(recipe.lake)
    check_reward_spec(recipe.reward)
    _check_sampler(recipe)
    if recipe.eval.reward is not None:
        check_reward_spec(recipe.eval.reward)
    data = load_task(recipe.task, recipe.seed_for("task"))
    check_rewards(recipe, data)
    if recipe.model.path:
        check_lengths(recipe, recipe.model.path, data)
        return
    with tempfile.TemporaryDirectory() as tmp:
        check_lengths(recipe, _build_base(recipe, _texts([data.prompts, data.eval, data.labelled], recipe), tmp), data)


def _check_sampler(recipe: Recipe) -> None:
    """Grow's sampler options as Grow will pass them (without importing a GPU engine)."""
    import importlib.util

    from alignment.samplers import check_options
    from tasks.grow import sampler_options

    if recipe.grow.sampler == "vllm" and importlib.util.find_spec("vllm") is None:
        return  # vLLM runs on GPU workers; this machine cannot check its options
    check_options(recipe.grow.sampler, sampler_options(recipe, recipe.grow.batch_size))


PROBE_ROWS = 64


def check_rewards(recipe: Recipe, data: TaskData) -> None:
    """Call the reward (and the held-out reward) once on the first ``PROBE_ROWS`` held-out rows, each
    reference standing in for its completion, within ``reward_timeout_s``.

    A reward that raises, hangs, or returns strings, booleans, NaN or the wrong number of values is
    then one ``RewardError`` sentence before anything is committed. Reward models are not loaded here.
    """
    from alignment.reward_model import resolve_reward_spec
    from alignment.rewards import score, with_timeout

    rows = data.eval.head(PROBE_ROWS)
    prompts, references = rows["prompt"].to_list(), rows["reference"].to_list()
    specs = [recipe.reward] + ([recipe.eval.reward] if recipe.eval.reward not in (None, recipe.reward) else [])
    for spec in specs:
        if not _uses_reward_model(spec):
            score(with_timeout(resolve_reward_spec(spec), recipe.reward_timeout_s), prompts, references, references)


def _uses_reward_model(spec: object) -> bool:
    if isinstance(spec, str):
        return spec.startswith("rm:")
    if isinstance(spec, dict):
        return _uses_reward_model(spec.get("ensemble"))
    return isinstance(spec, list) and any(_uses_reward_model(s) for s in spec)


def check_lengths(recipe: Recipe, model_dir: str, data: TaskData) -> None:
    """One sentence when a prompt leaves no room for ``max_new_tokens`` in the model's context."""
    from transformers import AutoConfig, GenerationConfig

    from alignment.models import load_tokenizer
    from alignment.prompting import Formatter

    _check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        generation = None
    fmt = Formatter(tokenizer, recipe.prompt_format(), model_config=config, generation_config=generation)
    fmt.check_prompts(data.prompts["prompt"].to_list(), recipe.grow.max_new_tokens, "training prompts")
    fmt.check_prompts(data.eval["prompt"].to_list(), recipe.eval.max_new_tokens, "held-out prompts")


def _check_model_dir(path: str) -> None:
    p = Path(path)
    if not (p / "config.json").exists():
        raise InputError(f"model.path {path} is not a model directory (no config.json); point it at a save_pretrained folder.")
    weights = [*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.safetensors.index.json")]
    if not weights:
        raise InputError(f"model.path {path} has a config.json but no weights (*.safetensors or *.bin); save the model with save_pretrained.")


def _texts(frames: list[pl.DataFrame], recipe: Recipe) -> list[str]:
    """Every text the built-in character tokenizer must know: the task's, the system message, the stop strings."""
    texts = [t for f in frames for col in ("prompt", "reference", "completion") if col in f.columns for t in f[col].drop_nulls().to_list()]
    return texts + [recipe.prompt.system or ""] + list(recipe.prompt.stop)


def _build_base(recipe: Recipe, texts: list[str], out: str) -> str:
    from alignment.models import build_tiny_model

    cfg = recipe.model
    build_tiny_model(
        texts, out, arch=cfg.arch, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
        n_positions=cfg.n_positions, seed=recipe.seed_for("base"),
    )
    return out


def _base_model(ref: RunRef, uris: dict[str, str]) -> str:
    cfg = ref.recipe.model
    if cfg.path:
        _check_model_dir(cfg.path)
        return str(Path(cfg.path).resolve())
    lake = ref.open_lake()
    uri = ref.stage(0, "base")
    if not lake.is_done(uri):  # the inputs were committed by an attempt that stopped before the model
        frames = [lake.read(uris[name]) for name in ("prompts", "eval_prompts", "labelled")]
        with tempfile.TemporaryDirectory() as tmp:
            lake.put_dir(_build_base(ref.recipe, _texts(frames, ref.recipe), tmp), uri, extra={"kind": "base-model"})
    return uri
