"""Samplers: ``generate(prompts, n, params) -> Generation``, seeded and reproducible.

Backends: ``transformers`` (the embedded default, CPU or GPU), ``vllm`` (offline engine on GPU
workers) and ``openai`` (any OpenAI-compatible server such as a ``vllm serve`` fleet). Only the
chosen backend is imported, inside ``make_sampler``, so importing this package is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding. ``logprobs`` asks for the token ids of
    each prompt and sample and the samples' log-probabilities under the model (``Generation.prompt_token_ids``,
    ``token_ids``, ``token_logps``); a sampler that cannot give them leaves those empty."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0
    logprobs: bool = False


@dataclass
class Generation:
    """``completions[i][j]`` is the j-th sample for prompt i; ``num_tokens`` counts its generated tokens
    (including the end token) and ``finish_reasons`` says ``stop`` (the model ended it) or ``length``
    (``max_new_tokens`` cut it off). With ``SamplingParams.logprobs``, ``prompt_token_ids[i]`` are the ids the
    model was given for prompt i, ``token_ids[i][j]`` the sample's ``num_tokens`` generated ids and
    ``token_logps[i][j]`` their log-probabilities under the model, taken from the logits that generated them
    (before temperature, top-p or sampling noise)."""

    completions: list[list[str]]
    num_tokens: list[list[int]] = field(default_factory=list)
    finish_reasons: list[list[str]] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    token_ids: list[list[list[int]]] = field(default_factory=list)
    token_logps: list[list[list[float]]] = field(default_factory=list)


class Sampler(Protocol):
    def generate(
        self, prompts: Sequence[str], n: int, params: SamplingParams, prompt_ids: Sequence[int] | None = None
    ) -> Generation: ...


def row_seed(seed: int, prompt_id: int, sample_idx: int) -> int:
    """A per-sample seed, so a sample depends only on (seed, prompt, index), not on batching or sharding."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_id * 0xBF58476D1CE4E5B9 + sample_idx * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


def request_ids(prompts: Sequence[str], n: int, prompt_ids: Sequence[int] | None) -> list[int]:
    """The prompt ids a sampler seeds with (positions by default), after checking ``n`` and their count."""
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n}): it is the number of samples per prompt.")
    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(prompts)))
    if len(ids) != len(prompts):
        raise ValueError(f"Got {len(ids)} prompt_ids for {len(prompts)} prompts: pass one id per prompt.")
    return ids


def sampler_options(recipe, batch_size: int) -> dict:
    """The recipe's options for its sampler backend, as ``flywheel run`` builds it for Grow and evaluation.

    Each backend takes what it understands: the transformers sampler loads the model itself (batch
    size, dtype, remote code); remote backends take their connection settings from ``sampler_options``.
    Every backend gets the prompt format, so all of them show the model the same tokens.
    """
    g = recipe.grow
    common = {"prompt": recipe.prompt_format()}
    if g.sampler == "transformers":
        common |= {"batch_size": batch_size, "trust_remote_code": recipe.model.trust_remote_code, "dtype": recipe.model.dtype}
    elif g.sampler == "vllm":
        common |= {"trust_remote_code": recipe.model.trust_remote_code, "dtype": recipe.model.dtype}
    return {**common, **g.sampler_options}


def make_sampler(backend: str, model_path: str, **options: Any) -> Sampler:
    """Build the sampler for ``backend`` over the model at ``model_path``.

    An option the backend does not take is one sentence naming it and the ones it does take
    (``grow.sampler_options`` comes straight from a recipe).
    """
    return check_options(backend, options)(model_path, **options)


def check_options(backend: str, options: dict[str, Any]):
    """The backend's sampler class, after checking it takes every option (one sentence naming any it does not)."""
    import inspect

    from alignment.errors import ConfigError

    cls = _backend(backend)
    sig = inspect.signature(cls.__init__)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [n for n, p in sig.parameters.items() if n not in ("self", "model_path") and p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown and not takes_any:
        raise ConfigError(
            f"The {backend!r} sampler does not take {', '.join(map(repr, unknown))}; "
            f"its options are {', '.join(allowed)} (grow.sampler_options)"
            + ("; stop strings go in prompt.stop." if any("stop" in k for k in unknown) else ".")
        )
    missing = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty and n not in options]
    if missing:
        raise ConfigError(f"The {backend!r} sampler needs {', '.join(map(repr, missing))} in grow.sampler_options.")
    check_settings = getattr(cls, "check_settings", None)  # a backend's own checks of its option values
    if check_settings is not None:
        try:
            check_settings(options)
        except ValueError as exc:
            raise ConfigError(f"The {backend!r} sampler's grow.sampler_options.{exc}") from None
    return cls


def _backend(backend: str):
    if backend == "transformers":
        from alignment.samplers.hf import TransformersSampler

        return TransformersSampler
    if backend == "vllm":
        from alignment.samplers.vllm import VLLMSampler

        return VLLMSampler
    if backend == "openai":
        from alignment.samplers.openai import OpenAISampler

        return OpenAISampler
    raise ValueError(f"Unknown sampler backend {backend!r}: use 'transformers', 'vllm' or 'openai'.")
