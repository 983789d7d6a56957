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
    """How to sample. ``temperature == 0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0


@dataclass
class Generation:
    """``completions[i][j]`` is the j-th sample for prompt i; ``num_tokens`` counts its generated tokens."""

    completions: list[list[str]]
    num_tokens: list[list[int]] = field(default_factory=list)


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


def make_sampler(backend: str, model_path: str, **options: Any) -> Sampler:
    """Build the sampler for ``backend`` over the model at ``model_path``."""
    if backend == "transformers":
        from alignment.samplers.hf import TransformersSampler

        return TransformersSampler(model_path, **options)
    if backend == "vllm":
        from alignment.samplers.vllm import VLLMSampler

        return VLLMSampler(model_path, **options)
    if backend == "openai":
        from alignment.samplers.openai import OpenAISampler

        return OpenAISampler(model_path, **options)
    raise ValueError(f"Unknown sampler backend {backend!r}: use 'transformers', 'vllm' or 'openai'.")
