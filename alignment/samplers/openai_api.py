"""The OpenAI completions API on the wire, for ``alignment.samplers.openai``: request bodies (one
prompt's samples split into requests, each seeded by its prompt and first sample index), the parsing
of completions and chat responses, and what an error answer says and whether it is worth a retry.

Pure functions over JSON bodies and ``httpx`` responses: no connection is opened here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from alignment.samplers import SamplingParams, request_ids, row_seed

MAX_RETRY_AFTER_S = 60.0
# The body keys a request sets itself; ``extra_body`` may not override them.
CORE_KEYS = frozenset({"model", "prompt", "n", "seed", "temperature", "top_p", "max_tokens"})


class FewerChoices(ValueError):
    """A response holds fewer choices than the ``n`` asked for: the server ignores ``n``."""


def completions_url(base_url: str, chat: bool = False) -> str:
    """``http://host:8000/v1`` or ``http://host:8000`` → ``http://host:8000/v1/completions`` (or ``/chat/completions``)."""
    base = base_url.rstrip("/")
    if not urlsplit(base).path.endswith("/v1"):
        base += "/v1"
    return base + ("/chat/completions" if chat else "/completions")


def build_request(
    prompt: str,
    prompt_id: int,
    n: int,
    params: SamplingParams,
    model: str,
    extra_body: dict[str, Any] | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    stop: Sequence[str] = (),
    first: int = 0,
) -> dict[str, Any]:
    """The JSON body of one request: ``n`` samples of ``prompt`` (or of chat ``messages``) from sample
    index ``first`` on, seeded by the prompt's id and ``first``."""
    body: dict[str, Any] = {
        "model": model,
        **({"messages": messages} if messages is not None else {"prompt": prompt}),
        "n": n,
        "seed": row_seed(params.seed, prompt_id, first),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        **({"stop": list(stop)} if stop else {}),
    }
    return body | (extra_body or {})


def request_plan(n: int, per_request: int | None = None) -> list[tuple[int, int]]:
    """``(first sample index, samples)`` of each request for one prompt's ``n`` samples, at most
    ``per_request`` in each (``None``: all ``n`` in one request)."""
    per = n if per_request is None else max(1, min(per_request, n))
    return [(k, min(per, n - k)) for k in range(0, n, per)]


def build_requests(
    prompts: Sequence[str],
    n: int,
    params: SamplingParams,
    model: str,
    prompt_ids: Sequence[int] | None = None,
    extra_body: dict[str, Any] | None = None,
    *,
    formatter: Any = None,
    per_request: int | None = None,
) -> list[dict[str, Any]]:
    """The request bodies for ``n`` samples of every prompt, in prompt order (each prompt's split by
    ``request_plan``); ``prompt_ids`` default to positions.

    With a chat ``formatter`` (``alignment.prompting.Formatter``) each body carries its messages.
    """
    ids = request_ids(prompts, n, prompt_ids)
    chat = formatter is not None and formatter.chat
    stop = formatter.fmt.stop if formatter is not None else ()
    return [
        build_request(p, i, m, params, model, extra_body, messages=formatter.messages(p) if chat else None, stop=stop, first=k)
        for p, i in zip(prompts, ids, strict=True)
        for k, m in request_plan(n, per_request)
    ]


def _text(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    if isinstance(choice.get("text"), str):
        return choice["text"]
    message = choice.get("message")
    return message.get("content") if isinstance(message, dict) and isinstance(message.get("content"), str) else None


def parse_response(body: Any, n: int) -> tuple[list[str], list[int], list[str]]:
    """``(texts, token_counts, finish_reasons)`` of one completions or chat response, ordered by choice index.

    Raises ``ValueError`` naming what is missing when ``body`` is not such a response, ``FewerChoices``
    (a ``ValueError``) when it holds at least one but fewer than ``n`` choices.
    """
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not all(_text(c) is not None for c in choices):
        raise ValueError("no 'choices' list of objects with 'text' or 'message.content'")
    if len(choices) != n:
        raise (FewerChoices if 0 < len(choices) < n else ValueError)(f"{len(choices)} choices for n={n}")
    choices = sorted(choices, key=lambda c: c.get("index", 0))
    usage = body.get("usage") or {}
    reasons = ["length" if c.get("finish_reason") == "length" else "stop" for c in choices]
    return [_text(c) for c in choices], [_token_count(c, usage, n) for c in choices], reasons


def _token_count(choice: dict[str, Any], usage: dict[str, Any], n: int) -> int:
    """Per-sample tokens from logprobs, else the request's usage when it asked for one sample, else 0."""
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):  # the chat form
        return len(logprobs["content"])
    completion_tokens = usage.get("completion_tokens")
    if n == 1 and isinstance(completion_tokens, int):
        return completion_tokens
    return 0


def retry_after(response: httpx.Response) -> float:
    """The server's ``Retry-After`` in seconds (numeric form only), capped; 0 when absent."""
    try:
        return min(max(float(response.headers.get("retry-after", 0)), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0


def is_retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def error_detail(response: httpx.Response, key: str | None) -> str:
    """The server's own error message, on one line, short, with any echo of the API key masked."""
    try:
        payload = response.json()
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        text = error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except ValueError:
        text = response.text
    if key:
        text = str(text).replace(key, "***")
    return " ".join(str(text).split())[:200].rstrip(".") or "no message"
