"""The ``vllm`` sampler: vLLM's offline engine (``vllm.LLM``) on a GPU worker.

One engine request per prompt asks for all ``n`` samples at once (vLLM shares the prompt's KV
cache across them). Each request carries its own seed, ``row_seed(seed, prompt_id, 0)``; vLLM
gives the k-th of the ``n`` samples the seed ``request_seed + k``, so a prompt's samples depend only
on ``(seed, prompt_id)``, not on which other prompts share the batch or shard.

Prompts reach the engine as token ids from ``alignment.prompting`` (the chat template applied and
special tokens added exactly as for training), and every end id the model declares plus the recipe's
stop strings stop a sample, so vLLM sees the same tokens as every other path; each sample records
vLLM's ``finish_reason``.

Departures from the ``transformers`` sampler: the noise comes from vLLM's own per-request
generators, so the two backends draw different samples for the same seed (both are reproducible),
and vLLM may choose a different precision than transformers under ``dtype="auto"``.

vLLM is imported inside the constructor, so importing this module needs no GPU:
``pip install 'flywheel[gpu]'`` on GPU workers only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alignment.progress import Ticker, reporting_now
from alignment.samplers import Generation, SamplingParams, request_ids, row_seed


def build_requests(
    prompts: Sequence[str], n: int, params: SamplingParams, prompt_ids: Sequence[int] | None = None, formatter=None
) -> list[dict[str, Any]]:
    """One engine request per prompt: ``{"prompt": ..., "sampling_params": kwargs for vllm.SamplingParams}``.

    With a ``formatter`` (``alignment.prompting.Formatter``) the prompt is ``{"prompt_token_ids": [...]}``
    and the sampling parameters carry every end id and stop string; without one, the prompt text as is.
    """
    ids = request_ids(prompts, n, prompt_ids)
    encoded = formatter.check_prompts(prompts, params.max_new_tokens) if formatter is not None else None
    stops = {"stop_token_ids": list(formatter.end_ids), **({"stop": list(formatter.fmt.stop)} if formatter.fmt.stop else {})} if formatter else {}
    return [
        {
            "prompt": {"prompt_token_ids": encoded[k]} if encoded is not None else prompt,
            "sampling_params": {
                "n": n,
                "seed": row_seed(params.seed, prompt_id, 0),
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_tokens": params.max_new_tokens,
                **stops,
            },
        }
        for k, (prompt, prompt_id) in enumerate(zip(prompts, ids, strict=True))
    ]


def parse_outputs(outputs: Sequence[Any], n: int) -> Generation:
    """Turn vLLM ``RequestOutput``s (in prompt order) into a ``Generation``, samples ordered by index."""
    completions: list[list[str]] = []
    num_tokens: list[list[int]] = []
    reasons: list[list[str]] = []
    for i, output in enumerate(outputs):
        samples = sorted(output.outputs, key=lambda s: s.index)
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {n}.")
        completions.append([s.text for s in samples])
        num_tokens.append([len(s.token_ids) for s in samples])
        reasons.append(["length" if getattr(s, "finish_reason", "stop") == "length" else "stop" for s in samples])
    return Generation(completions=completions, num_tokens=num_tokens, finish_reasons=reasons)


def _import_vllm():
    """Import vLLM, or say in one sentence how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "The 'vllm' sampler needs the vllm package: install flywheel[gpu] on a GPU worker "
            "(or use the 'transformers' sampler on this machine)."
        ) from exc
    return vllm


class VLLMSampler:
    """Sample from a local checkpoint with vLLM's offline engine; one engine per sampler."""

    def __init__(
        self,
        model_path: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_model_len: int | None = None,
        prompt: Any = None,
        progress: bool = True,
        **engine_kwargs: Any,
    ):
        """Start the engine; ``engine_kwargs`` go to ``vllm.LLM`` unchanged (e.g. ``enforce_eager=True``).

        ``prompt`` is the recipe's prompt format; ``dtype`` ``float32``/``bfloat16``/``float16`` or ``auto``.
        """
        vllm = _import_vllm()
        formatter = _formatter(model_path, prompt, trust_remote_code)
        engine = vllm.LLM(
            model=str(model_path),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            max_model_len=max_model_len,
            **engine_kwargs,
        )
        self._bind(engine, vllm.SamplingParams, progress, formatter)

    @classmethod
    def from_engine(
        cls, engine: Any, make_params: Callable[..., Any] | None = None, *, progress: bool = False, formatter=None
    ) -> VLLMSampler:
        """Wrap an engine that is already running (e.g. one colocated with a trainer).

        ``make_params`` builds a request's sampling parameters from keyword arguments; it defaults
        to ``vllm.SamplingParams``. With a ``formatter`` prompts go in as token ids.
        """
        sampler = cls.__new__(cls)
        sampler._bind(engine, make_params or _import_vllm().SamplingParams, progress, formatter)
        return sampler

    def _bind(self, engine: Any, make_params: Callable[..., Any], progress: bool, formatter=None) -> None:
        self.engine = engine
        self.make_params = make_params
        self.progress = progress
        self.formatter = formatter

    def generate(
        self, prompts: Sequence[str], n: int, params: SamplingParams, prompt_ids: Sequence[int] | None = None
    ) -> Generation:
        """``n`` samples per prompt, in prompt order; ``prompt_ids`` (default: positions) key the seeds."""
        requests = build_requests(prompts, n, params, prompt_ids, self.formatter)
        if not requests:
            return Generation(completions=[], num_tokens=[])
        outputs = self.engine.generate(
            [r["prompt"] for r in requests],
            [self.make_params(**r["sampling_params"]) for r in requests],
            use_tqdm=counting_bar(self.progress) if reporting_now() else self.progress,
        )
        return parse_outputs(outputs, n)


def counting_bar(show: bool):
    """A progress-bar class for vLLM's ``use_tqdm`` (which takes a tqdm factory): the bar vLLM would draw when
    ``show``, and a ``Ticker`` over the samples it counts, so a long Grow on vLLM reports how far it is in the
    log and the Prefect UI like the other samplers (``alignment.progress``)."""
    from tqdm.auto import tqdm

    class CountingBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = kwargs.get("disable", False) or not show
            super().__init__(*args, **kwargs)
            self.samples, self.tick = 0, Ticker(int(kwargs.get("total") or 0), "samples")

        def update(self, n: float | None = 1) -> bool | None:
            self.samples += int(n or 0)
            self.tick(self.samples)
            return super().update(n)

    return CountingBar


def _formatter(model_path: str, prompt: Any, trust_remote_code: bool):
    """The prompt format of the local model at ``model_path`` (tokenizer, context and end ids)."""
    from transformers import AutoConfig, GenerationConfig

    from alignment.models import load_tokenizer
    from alignment.prompting import Formatter

    try:
        generation = GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except OSError:
        generation = None
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, local_files_only=True)
    return Formatter(load_tokenizer(model_path, trust_remote_code=trust_remote_code), prompt, model_config=config,
                     generation_config=generation)
