"""The ``openai`` sampler: any OpenAI-compatible server, e.g. a ``vllm serve`` fleet.

With a chat prompt format (``prompt.format: chat``, or ``auto`` when the model directory's tokenizer
has a chat template) it calls ``/v1/chat/completions`` with the messages, so the server applies the
model's own template; with ``raw`` it calls ``/v1/completions`` with the text. Either way the
recipe's stop strings are sent as ``stop`` (and applied again to what comes back), and each sample
records the server's ``finish_reason`` (``stop`` or ``length``).

One HTTP request per prompt asks for all ``n`` samples with the seed ``row_seed(seed, prompt_id, 0)``,
so a prompt's samples depend only on ``(seed, prompt_id)`` (on servers that honour ``seed``, as
vLLM does), not on batching or sharding. ``n`` is optional in the OpenAI API and some servers ignore
it (``transformers serve`` answers with one choice whatever ``n`` is): when a response holds fewer
choices than asked, the sampler says so once in the log and, for the rest of its life, asks that
server for one sample per request, sample ``k`` seeded ``row_seed(seed, prompt_id, k)``, so the
samples still depend only on ``(seed, prompt_id, k)``. ``n_per_request`` caps the samples per request
from the start (``1``: one request per sample, the same samples the fallback gives; a request for
samples ``k..k+m-1`` is seeded ``row_seed(seed, prompt_id, k)``). Up to ``concurrency`` requests are
in flight at once; 429, 408 and 5xx answers and connection errors are retried with exponential backoff.

The API key is read at call time (``api_key=``, else the environment variable ``api_key_env``,
``OPENAI_API_KEY`` by default), sent only in the ``Authorization`` header, and never appears in logs
or error messages. A recipe names the variable, never the key.

Token counts: the completions API reports only a total per request (``usage``), so a sample's
count comes from its ``logprobs.tokens`` when the server returned them (ask with
``extra_body={"logprobs": 0}`` on vLLM), else from ``usage.completion_tokens`` when the request asked
for one sample (so with one request per sample every count is known), else it is 0.

Talks plain HTTP through httpx; the ``openai`` package is not needed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import httpx
from tqdm.auto import tqdm

from alignment.errors import RunFailure
from alignment.progress import Ticker
from alignment.samplers import Generation, SamplingParams, request_ids
from alignment.samplers.openai_api import (
    CORE_KEYS,
    FewerChoices,
    build_request,
    completions_url,
    error_detail,
    is_retryable,
    parse_response,
    request_plan,
    retry_after,
)

logger = logging.getLogger(__name__)



class RemoteSamplerError(RunFailure):
    """The server could not be reached, refused the work or answered nonsense; the message says what to do
    (a ``RunFailure``: the run stops with that one sentence, resumable)."""


class OpenAISampler:
    """Sample from a model served behind an OpenAI-compatible completions endpoint."""

    def __init__(
        self,
        model_path: str,
        *,
        base_url: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        model: str | None = None,
        concurrency: int = 8,
        max_retries: int = 3,
        timeout: float = 60.0,
        retry_backoff: float = 0.5,
        n_per_request: int | None = None,
        extra_body: dict[str, Any] | None = None,
        prompt: Any = None,
        progress: bool = True,
    ):
        """``model`` is the served model name (default ``model_path``, as ``vllm serve PATH`` names it);
        ``n_per_request`` caps the samples asked for in one request (default: all of a prompt's; ``1`` for
        servers that ignore ``n``); ``extra_body`` adds server-specific fields (e.g. ``{"top_k": 50}``) to
        every request; ``prompt`` is the recipe's prompt format (``alignment.prompting.PromptFormat`` or its dict)."""
        self.check_settings({"concurrency": concurrency, "max_retries": max_retries, "timeout": timeout,
                             "retry_backoff": retry_backoff, "n_per_request": n_per_request, "extra_body": extra_body})
        self.formatter = _formatter(model_path, prompt)
        self.url = completions_url(base_url, chat=self.formatter.chat)
        self.model = model or str(model_path)
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.retry_backoff = retry_backoff
        self.n_per_request = n_per_request
        self.extra_body = dict(extra_body or {})
        self.progress = progress
        self.ignores_n = False  # set, once and for good, by the first response with fewer choices than asked
        self._ignores_n_lock = threading.Lock()

    @staticmethod
    def check_settings(options: dict[str, Any]) -> None:
        """Raise a one-sentence ``ValueError`` for an option value the sampler cannot work with (no I/O)."""
        for name, low in (("concurrency", 1), ("max_retries", 0), ("n_per_request", 1)):
            value = options.get(name)
            if name not in options or (name == "n_per_request" and value is None):
                continue
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be a whole number >= {low} (got {value!r}).")
        for name, positive in (("timeout", True), ("retry_backoff", False)):
            value = options.get(name)
            if name in options and (type(value) not in (int, float) or value < 0 or (positive and value == 0)):
                raise ValueError(f"{name} must be a number {'>' if positive else '>='} 0 (got {value!r}).")
        extra = options.get("extra_body") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"extra_body must be a mapping of request fields to values (got {extra!r}).")
        clash = sorted((CORE_KEYS | {"messages", "stop"}) & set(extra))
        if clash:
            raise ValueError(f"extra_body may not set {clash}: they come from SamplingParams, n and model.")

    def generate(
        self, prompts: Sequence[str], n: int, params: SamplingParams, prompt_ids: Sequence[int] | None = None
    ) -> Generation:
        """``n`` samples per prompt, in prompt order; ``prompt_ids`` (default: positions) key the seeds."""
        ids = request_ids(prompts, n, prompt_ids)
        if not prompts:
            return Generation(completions=[], num_tokens=[])
        chat, stop = self.formatter.chat, self.formatter.fmt.stop

        def body_for(row: int, first: int, count: int) -> dict[str, Any]:
            messages = self.formatter.messages(prompts[row]) if chat else None
            return build_request(prompts[row], ids[row], count, params, self.model, self.extra_body,
                                 messages=messages, stop=stop, first=first)

        per = 1 if self.ignores_n else self.n_per_request
        jobs = [(row, first, count) for row in range(len(prompts)) for first, count in request_plan(n, per)]
        key = self.api_key if self.api_key is not None else os.environ.get(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        with httpx.Client(headers=headers, timeout=self.timeout, limits=limits) as client:
            results = self._run_all(client, body_for, jobs, key, total=len(prompts) * n)
        rows: list[list[tuple[str, int, str]]] = [[] for _ in prompts]
        for job in sorted(results):  # a prompt's jobs in sample order
            rows[job[0]].extend(zip(*results[job], strict=True))
        texts, counts, reasons = [], [], []
        for samples in rows:
            cut = [self.formatter.cut_text(t, r) for t, _, r in samples]
            texts.append([t for t, _ in cut])
            counts.append([c for _, c, _ in samples])
            reasons.append([r for _, r in cut])
        return Generation(completions=texts, num_tokens=counts, finish_reasons=reasons)

    def _run_all(
        self, client: httpx.Client, body_for, jobs: list[tuple[int, int, int]], key: str | None, total: int
    ) -> dict[tuple[int, int, int], tuple[list[str], list[int], list[str]]]:
        """Send every job ``(row, first sample, samples)`` with at most ``concurrency`` in flight; a job the
        server answers with fewer choices than asked comes back as one job per sample. The first failure
        (the earliest job among those failed) stops the rest."""
        stop = threading.Event()
        results: dict[tuple[int, int, int], tuple[list[str], list[int], list[str]]] = {}
        bar = tqdm(total=total, desc="sampling", unit="sample", disable=None if self.progress else True, leave=False)
        tick, sampled = Ticker(total, "samples"), 0  # progress where no bar is drawn (counted in this thread)
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-sampler") as pool:
                pending = {pool.submit(self._complete, client, body_for, job, key, stop): job for job in jobs}
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    failed = sorted((pending[f], f.exception()) for f in done if f.exception() is not None)
                    if failed:
                        stop.set()
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise failed[0][1]
                    for future in done:
                        row, first, count = job = pending.pop(future)
                        if future.result() is None:  # the server ignores n: one request per sample
                            for k in range(first, first + count):
                                pending[pool.submit(self._complete, client, body_for, (row, k, 1), key, stop)] = (row, k, 1)
                        else:
                            results[job] = future.result()
                            bar.update(count)
                            sampled += count
                            tick(sampled)
        finally:
            bar.close()
        return results

    def _complete(
        self,
        client: httpx.Client,
        body_for,
        job: tuple[int, int, int],
        key: str | None,
        stop: threading.Event,
    ) -> tuple[list[str], list[int], list[str]] | None:
        """POST one job's request, retrying transient failures, and parse its choices; ``None`` when the
        server turned out to ignore ``n`` (the job is then asked again one sample at a time)."""
        row, first, count = job
        if count > 1 and self.ignores_n:
            return None
        response = self._post_with_retries(client, body_for(row, first, count), key, stop)
        status = response.status_code
        if status in (401, 403):
            hint = "the API key it was sent" if key else "the request because no API key was sent"
            raise RemoteSamplerError(
                f"The server at {self.url} refused {hint} (HTTP {status}): "
                f"set {self.api_key_env} (or grow.sampler_options.api_key_env) to a key it accepts."
            )
        if status >= 400:
            raise RemoteSamplerError(
                f"The server at {self.url} rejected the request for prompt {row} "
                f"(HTTP {status}: {error_detail(response, key)}): check the model name {self.model!r} and the "
                "sampling parameters."
            )
        try:
            return parse_response(response.json(), count)
        except FewerChoices as exc:
            self._note_ignores_n(str(exc))
            return None
        except ValueError as exc:
            raise RemoteSamplerError(
                f"The server at {self.url} sent something other than a completions response for prompt "
                f"{row} ({exc}): check that base_url points at an OpenAI-compatible /v1 endpoint."
            ) from None

    def _note_ignores_n(self, what: str) -> None:
        """Remember that this server ignores ``n``, and say so in the log the first time."""
        with self._ignores_n_lock:
            if self.ignores_n:
                return
            self.ignores_n = True
        logger.warning(
            "The server at %s ignores n (it sent %s): each sample is now its own request, seeded by its prompt id "
            "and sample index; grow.sampler_options.n_per_request: 1 asks that way from the start.", self.url, what,
        )

    def _post_with_retries(
        self, client: httpx.Client, body: dict[str, Any], key: str | None, stop: threading.Event
    ) -> httpx.Response:
        """The first non-retryable response; raises once ``max_retries`` retries are spent."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if stop.is_set():
                raise RemoteSamplerError(f"Sampling from {self.url} stopped because another request failed.")
            delay = self.retry_backoff * 2**attempt
            try:
                response = client.post(self.url, json=body)
            except httpx.TransportError as exc:
                if attempt == attempts - 1:
                    raise RemoteSamplerError(
                        f"Could not reach {self.url} after {attempts} attempts ({type(exc).__name__}): "
                        "check base_url and that the server is running and reachable from this worker."
                    ) from exc
                reason = type(exc).__name__
            else:
                if not is_retryable(response.status_code):
                    return response
                if attempt == attempts - 1:
                    raise RemoteSamplerError(
                        f"The server at {self.url} kept failing (HTTP {response.status_code}: "
                        f"{error_detail(response, key)}) after {attempts} attempts: check that it is up and not "
                        "overloaded, or raise max_retries."
                    )
                reason = f"HTTP {response.status_code}"
                delay = max(delay, retry_after(response))
            logger.warning("Retrying %s in %.2fs after %s.", self.url, delay, reason)
            stop.wait(delay)
        raise AssertionError("unreachable: the loop returns or raises on its last attempt")


class _TextOnly:
    """The prompt format when no local tokenizer is at hand: raw text, the recipe's stop strings."""

    chat = False

    def __init__(self, fmt):
        self.fmt = fmt

    def messages(self, prompt: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}]

    def cut_text(self, text: str, finish_reason: str) -> tuple[str, str]:
        hits = [i for i in (text.find(s) for s in self.fmt.stop) if i >= 0]
        return (text[: min(hits)], "stop") if hits else (text, finish_reason)


class _ChatOnly(_TextOnly):
    """``prompt.format: chat`` against a served model whose tokenizer is not on this machine: the server templates."""

    chat = True

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.fmt.system}] if self.fmt.system else []
        return [*system, {"role": "user", "content": prompt}]


def _formatter(model_path: str, prompt: Any):
    """The prompt format for requests: from the model directory's tokenizer when it is here, else from the recipe."""
    from pathlib import Path

    from alignment.prompting import Formatter, PromptFormat

    fmt = PromptFormat.of(prompt)
    if (Path(str(model_path)) / "tokenizer_config.json").exists():
        from alignment.models import load_tokenizer

        return Formatter(load_tokenizer(model_path), fmt)
    return _ChatOnly(fmt) if fmt.format == "chat" else _TextOnly(fmt)
