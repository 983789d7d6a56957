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
from alignment.errors import ConfigError
from alignment.recipe import Recipe
from alignment.task_files import load_task


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
    check_distributed(recipe)
    data = load_task(recipe.task, recipe.seed_for("task"))
    check_rewards(recipe, data)
    return data


def check_model(recipe: Recipe, data: TaskData) -> None:
    """The half that loads transformers: the sampler takes its options, every prompt leaves room for
    ``max_new_tokens`` in the model's context (the built-in model is built to measure it), and the
    model can be trained the way ``distributed`` asks."""
    _check_sampler(recipe)
    if recipe.model.path:
        check_lengths(recipe, recipe.model.path, data)
        check_devices(recipe, recipe.model.path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(recipe, texts_of([data.prompts, data.eval, data.labelled], recipe), tmp)
        check_lengths(recipe, base, data)
        check_devices(recipe, base)


TRAINING_SECTIONS = {"rest": ("warm_start", "improve"), "iterative_dpo": ("warm_start", "preference"), "grpo": ("warm_start", "grpo")}


def check_distributed(recipe: Recipe) -> None:
    """Without a model library: every training step can give each rank a unit, and ``launcher: ray`` has a
    cluster to run on."""
    d = recipe.distributed
    if d.world_size == 1:
        return
    for name in TRAINING_SECTIONS.get(recipe.algorithm, ()):
        section = getattr(recipe, name, None)
        if section is None or (name == "warm_start" and not recipe.warm_start.enabled):
            continue
        if d.world_size > section.batch_size:
            raise ConfigError(
                f"distributed asks for {d.world_size} ranks but {name}.batch_size is {section.batch_size}, so some rank "
                f"would never train; use at most {section.batch_size} ranks or raise {name}.batch_size to at least {d.world_size}."
            )
    if d.launcher == "ray":
        _check_ray(recipe)


def _check_ray(recipe: Recipe) -> None:
    import importlib.util
    import os
    import socket

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("distributed.launcher is 'ray' but Ray is not installed: pip install -e '.[ray]'.")
    address = recipe.orchestration.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        if recipe.orchestration.runner == "ray":
            return  # the run starts its own local cluster (prefect-ray), which Ray Train then uses
        raise ConfigError(
            "distributed.launcher is 'ray' but the run has no Ray cluster: set orchestration.ray_address (or RAY_ADDRESS), "
            "or orchestration.runner: ray to start a local one."
        )
    if address == "auto":
        return  # the node's own cluster, found by Ray itself
    host, _, port = address.removeprefix("ray://").partition(":")
    try:
        socket.create_connection((host, int(port or 10001)), timeout=3).close()
    except (OSError, ValueError):
        raise ConfigError(
            f"distributed.launcher is 'ray' but no Ray cluster answers at {address}; start it (ray start --head) or fix "
            "orchestration.ray_address."
        ) from None


def check_devices(recipe: Recipe, model_dir: str) -> None:
    """One sentence before training when the node has fewer GPUs than ranks, or FSDP finds no decoder layers to shard."""
    d = recipe.distributed
    if d.world_size == 1:
        return
    import torch

    if torch.cuda.is_available() and d.launcher == "torchrun" and torch.cuda.device_count() < d.processes:
        raise ConfigError(
            f"distributed.processes is {d.processes} but this node has {torch.cuda.device_count()} GPU(s); use one "
            "process per GPU."
        )
    if d.strategy == "fsdp":
        from transformers import AutoConfig, AutoModelForCausalLM

        from alignment.distributed import LayersNotFound, decoder_layers

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        try:
            decoder_layers(model)
        except LayersNotFound as exc:
            raise ConfigError(str(exc)) from None


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
        raise ConfigError(f"model.path {path} is not a model directory (no config.json); point it at a save_pretrained folder.")
    weights = [*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.safetensors.index.json")]
    if not weights:
        raise ConfigError(f"model.path {path} has a config.json but no weights (*.safetensors or *.bin); save the model with save_pretrained.")


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
