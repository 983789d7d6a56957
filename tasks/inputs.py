"""The run's inputs as iteration 0 of the lake: prompts, held-out prompts, labelled data, base model.

Bad input is caught here, before anything is written: a missing file, a missing column or an
empty table is one sentence naming the file and what to do.
"""

from __future__ import annotations

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


def _read_table(path: str, what: str) -> pl.DataFrame:
    p = Path(path)
    if not p.exists():
        raise InputError(f"The {what} file {path} does not exist; fix task.{what} in the recipe or pass --set task.{what}=PATH.")
    try:
        if p.suffix in (".jsonl", ".ndjson", ".json"):
            frame = pl.read_ndjson(p)
        elif p.suffix == ".parquet":
            frame = pl.read_parquet(p)
        else:
            raise InputError(f"The {what} file {path} must be JSONL (.jsonl) or Parquet (.parquet).")
    except InputError:
        raise
    except Exception as exc:
        if p.suffix != ".parquet" and not p.read_text(errors="replace").strip():  # polars can't read nothing
            raise InputError(f"The {what} file {path} has no rows; it needs at least one prompt.") from None
        raise InputError(f"Could not read the {what} file {path} ({type(exc).__name__}: {exc}).") from exc
    if frame.height == 0:
        raise InputError(f"The {what} file {path} has no rows; it needs at least one prompt.")
    return frame


def _columns(frame: pl.DataFrame, path: str, what: str, need: dict[str, str]) -> pl.DataFrame:
    """Rename the recipe's columns to ours, or fail naming the missing one."""
    missing = [src for src in need.values() if src not in frame.columns]
    if missing:
        raise InputError(
            f"The {what} file {path} has no column {missing[0]!r} (columns: {', '.join(frame.columns)}); "
            f"rename it or set task.{_setting(need, missing[0], what)}."
        )
    out = frame.select([pl.col(src).cast(pl.Utf8).alias(dst) for dst, src in need.items()])
    return out.with_row_index("prompt_id").with_columns(pl.col("prompt_id").cast(pl.Int64))


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
        data = load_task(recipe.task, recipe.seed)
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

    check_reward_spec(recipe.reward)
    _check_sampler(recipe)
    if recipe.eval.reward is not None:
        check_reward_spec(recipe.eval.reward)
    data = load_task(recipe.task, recipe.seed)
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
        n_positions=cfg.n_positions, seed=recipe.seed,
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
