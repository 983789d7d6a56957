"""Checks ``flywheel run`` makes before Prefect runs anything, cheapest first, so a mistake is one
sentence in seconds and nothing is written. ``check_inputs`` loads no model library: the lake is
writable, the model folder has a config and weights, the rewards resolve and behave on a few
held-out rows, the task's files are well formed.
``check_model`` loads transformers: the sampler takes its options, and every prompt leaves room for
``max_new_tokens`` in the model's context. ``prepare_inputs`` makes the file and length checks
again inside the flow (a run started from a deployment does not pass through the CLI).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl

from alignment.arithmetic import TaskData
from alignment.recipe import Recipe
from alignment.task_files import InputError, load_task


def check_inputs(recipe: Recipe) -> TaskData:
    """The cheap half, no model library: the lake is writable, the model folder has a config and
    weights, the rewards resolve and behave, the task's files are well formed. Returns the task's
    tables for ``check_model``."""
    from alignment.rewards import check_reward_spec
    from tasks.lake import check_writable

    check_writable(recipe.lake)
    if recipe.model.path:
        check_model_dir(recipe.model.path)  # the folder's files; reading them is check_model's
    check_reward_spec(recipe.reward)
    if recipe.eval.reward is not None:
        check_reward_spec(recipe.eval.reward)
    data = load_task(recipe.task, recipe.seed_for("task"))
    check_rewards(recipe, data)
    return data


def check_model(recipe: Recipe, data: TaskData) -> None:
    """The half that loads transformers: the sampler takes its options, and every prompt leaves room
    for ``max_new_tokens`` in the model's context (the built-in model is built to measure it)."""
    _check_sampler(recipe)
    if recipe.model.path:
        check_lengths(recipe, recipe.model.path, data)
        return
    with tempfile.TemporaryDirectory() as tmp:
        check_lengths(recipe, build_base(recipe, texts_of([data.prompts, data.eval, data.labelled], recipe), tmp), data)


def _check_sampler(recipe: Recipe) -> None:
    """Grow's sampler options as Grow will pass them (without importing a GPU engine)."""
    import importlib.util

    from alignment.samplers import check_options, sampler_options

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
    from alignment.rewards import resolve_reward_spec, score, uses_reward_model, with_timeout

    rows = data.eval.head(PROBE_ROWS)
    prompts, references = rows["prompt"].to_list(), rows["reference"].to_list()
    specs = [recipe.reward] + ([recipe.eval.reward] if recipe.eval.reward not in (None, recipe.reward) else [])
    for spec in specs:
        if not uses_reward_model(spec):
            score(with_timeout(resolve_reward_spec(spec), recipe.reward_timeout_s), prompts, references, references)


def check_lengths(recipe: Recipe, model_dir: str, data: TaskData) -> None:
    """One sentence when a prompt leaves no room for ``max_new_tokens`` in the model's context."""
    from transformers import AutoConfig, GenerationConfig

    from alignment.models import load_tokenizer
    from alignment.prompting import Formatter

    check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        generation = None
    fmt = Formatter(tokenizer, recipe.prompt_format(), model_config=config, generation_config=generation)
    fmt.check_prompts(data.prompts["prompt"].to_list(), recipe.grow.max_new_tokens, "training prompts")
    fmt.check_prompts(data.eval["prompt"].to_list(), recipe.eval.max_new_tokens, "held-out prompts")


def check_model_dir(path: str) -> None:
    p = Path(path)
    if not (p / "config.json").exists():
        raise InputError(f"model.path {path} is not a model directory (no config.json); point it at a save_pretrained folder.")
    weights = [*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.safetensors.index.json")]
    if not weights:
        raise InputError(f"model.path {path} has a config.json but no weights (*.safetensors or *.bin); save the model with save_pretrained.")


def texts_of(frames: list[pl.DataFrame], recipe: Recipe) -> list[str]:
    """Every text the built-in character tokenizer must know: the task's, the system message, the stop strings."""
    texts = [t for f in frames for col in ("prompt", "reference", "completion") if col in f.columns for t in f[col].drop_nulls().to_list()]
    return texts + [recipe.prompt.system or ""] + list(recipe.prompt.stop)


def build_base(recipe: Recipe, texts: list[str], out: str) -> str:
    from alignment.models import build_tiny_model

    cfg = recipe.model
    build_tiny_model(
        texts, out, arch=cfg.arch, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
        n_positions=cfg.n_positions, seed=recipe.seed_for("base"),
    )
    return out
