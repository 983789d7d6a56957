"""A small, real OpenAI-compatible server for tests, on 127.0.0.1: ``/v1/completions`` and ``/v1/chat/completions``.

It serves a local model through the ``transformers`` sampler — raw text on the completions endpoint,
the model's chat template on the chat endpoint, as ``vllm serve`` does — reports each choice's
``finish_reason``, honours ``stop`` strings, checks a bearer key the way OpenAI
does (and, like OpenAI, echoes the offending key in its error, so tests can check clients never
repeat it), and can be told to answer the next K requests with 503 to exercise client retries, or to
ignore ``n`` and answer every request with one choice, as ``transformers serve`` does (``ignores_n``).

    with serve_completions(model_dir, api_key="sk-test") as server:
        OpenAISampler(model_dir, base_url=server.base_url, api_key="sk-test").generate(...)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from alignment.prompting import Formatter
from alignment.samplers import SamplingParams
from alignment.samplers.hf import TransformersSampler


class _Sampling(BaseModel):
    """The sampling fields both endpoints take, as the samplers send them."""

    model: str
    n: int = Field(default=1, ge=1)
    seed: int = Field(default=0, ge=0, lt=2**63)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=16, ge=1)
    stop: str | list[str] | None = None


class CompletionRequest(_Sampling):
    """The subset of OpenAI's completions request that the samplers send."""

    prompt: str | list[str]


class ChatRequest(_Sampling):
    """The subset of OpenAI's chat completions request that the samplers send."""

    messages: list[dict[str, str]]


@dataclass
class ServerState:
    """What a test can steer and observe: injected failures, whether ``n`` is ignored, and the requests seen."""

    fail_next: int = 0
    ignores_n: bool = False
    requests_seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_failure(self) -> bool:
        """Count a request; True while injected failures remain."""
        with self.lock:
            self.requests_seen += 1
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def create_app(
    samplers: dict[str, TransformersSampler], model_name: str, state: ServerState, api_key: str | None
) -> FastAPI:
    """The app over ``samplers`` (``raw`` and ``chat``); choices are indexed ``prompt * n + sample``."""
    app = FastAPI()
    generate_lock = threading.Lock()  # one model, one generation at a time, like a single GPU

    def refuse(body, request: Request) -> JSONResponse | None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            sent = request.headers.get("authorization", "").removeprefix("Bearer ")
            return _error(401, f"Incorrect API key provided: {sent}.", "invalid_request_error")
        if state.take_failure():
            return _error(503, "Injected failure: the server is overloaded.", "server_error")
        if body.model != model_name:
            return _error(404, f"The model `{body.model}` does not exist.", "invalid_request_error")
        return None

    def run(kind: str, prompts: list[str], body, system: str | None = None) -> tuple[list[str], list[int], list[str]]:
        params = SamplingParams(body.temperature, body.top_p, body.max_tokens, body.seed)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        sampler = samplers[kind]
        with generate_lock:
            base = sampler.formatter
            if system is not None:
                sampler.formatter = Formatter(sampler.tokenizer, {"format": "chat", "system": system},
                                              model_config=sampler.model.config, generation_config=sampler.model.generation_config)
            try:
                n = 1 if state.ignores_n else body.n  # like transformers serve: one choice whatever n is
                out = sampler.generate(prompts, n, params, prompt_ids=[0] * len(prompts))
            finally:
                sampler.formatter = base
        texts, counts, reasons = [], [], []
        for row_t, row_c, row_r in zip(out.completions, out.num_tokens, out.finish_reasons, strict=True):
            for t, c, r in zip(row_t, row_c, row_r, strict=True):
                hits = [i for i in (t.find(x) for x in stops) if i >= 0]
                texts.append(t[: min(hits)] if hits else t)
                counts.append(c)
                reasons.append("stop" if hits else r)
        return texts, counts, reasons

    def usage(counts: list[int]) -> dict:
        return {"prompt_tokens": 0, "completion_tokens": sum(counts), "total_tokens": sum(counts)}

    @app.post("/v1/completions")
    def completions(body: CompletionRequest, request: Request):
        if (refused := refuse(body, request)) is not None:
            return refused
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        texts, counts, reasons = run("raw", prompts, body)
        return {
            "id": f"cmpl-{state.requests_seen}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [
                {"index": k, "text": t, "logprobs": None, "finish_reason": r} for k, (t, r) in enumerate(zip(texts, reasons))
            ],
            "usage": usage(counts),
        }

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest, request: Request):
        if (refused := refuse(body, request)) is not None:
            return refused
        users = [m["content"] for m in body.messages if m.get("role") == "user"]
        system = next((m["content"] for m in body.messages if m.get("role") == "system"), None)
        if len(users) != 1:
            return _error(400, "This test server takes exactly one user message.", "invalid_request_error")
        texts, counts, reasons = run("chat", users, body, system)
        return {
            "id": f"chatcmpl-{state.requests_seen}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [
                {"index": k, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                for k, (t, r) in enumerate(zip(texts, reasons))
            ],
            "usage": usage(counts),
        }

    return app


@dataclass
class RunningServer:
    """A started server: where to reach it and what to steer."""

    base_url: str
    state: ServerState


def free_port() -> int:
    """A loopback port that nothing listens on at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_completions(
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    ignores_n: bool = False,
    startup_timeout: float = 20.0,
) -> Iterator[RunningServer]:
    """Run the server in a thread on a free loopback port until the block ends."""
    name = model_name or str(model_dir)
    samplers = {
        "raw": TransformersSampler(str(model_dir), device="cpu", progress=False, prompt={"format": "raw"}),
        "chat": TransformersSampler(str(model_dir), device="cpu", progress=False),  # the template, when it has one
    }
    state = ServerState(ignores_n=ignores_n)
    config = uvicorn.Config(create_app(samplers, name, state, api_key), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"The test completions server did not start within {startup_timeout} s.")
            time.sleep(0.02)
        yield RunningServer(base_url=f"http://127.0.0.1:{port}/v1", state=state)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
