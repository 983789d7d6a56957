"""The OpenAI-compatible sampler against a real HTTP server on 127.0.0.1 backed by the transformers
sampler over a tiny model (vLLM's offline engine: tests/test_sampler_vllm.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from openai_compat_server import free_port, serve_completions

from alignment.models import build_tiny_gpt2
from alignment.samplers import SamplingParams, make_sampler, row_seed
from alignment.samplers.hf import TransformersSampler
from alignment.samplers.openai import OpenAISampler, RemoteSamplerError
from alignment.samplers.openai_api import FewerChoices, build_requests, completions_url, parse_response
from alignment.samplers.vllm import parse_outputs
from alignment.samplers.vllm import build_requests as build_vllm_requests

API_KEY = "sk-flywheel-test-5f3a9c"
PROMPTS = ["12+3=", "7+4=", "90+9="]
PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=7)


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith("."), message


# --- OpenAI-compatible: pure request building and parsing -----------------------------------


def test_openai_requests_carry_sampling_fields_and_per_prompt_seeds():
    bodies = build_requests(["a", "b"], 3, PARAMS, "served", prompt_ids=[4, 9], extra_body={"top_k": 5})
    assert bodies == [
        {"model": "served", "prompt": p, "n": 3, "seed": row_seed(7, pid, 0), "temperature": 1.0, "top_p": 0.95,
         "max_tokens": 6, "top_k": 5}
        for p, pid in [("a", 4), ("b", 9)]
    ]


def test_openai_sampler_refuses_extra_body_that_overrides_sampling():
    with pytest.raises(ValueError, match=r"\['n', 'seed'\]"):
        OpenAISampler("m", base_url="http://127.0.0.1:1/v1", extra_body={"seed": 1, "n": 2})


@pytest.mark.parametrize(
    "base, url",
    [
        ("http://h:8000/v1", "http://h:8000/v1/completions"),
        ("http://h:8000/v1/", "http://h:8000/v1/completions"),
        ("http://h:8000", "http://h:8000/v1/completions"),
        ("https://h/openai/v1", "https://h/openai/v1/completions"),
    ],
)
def test_completions_url(base, url):
    assert completions_url(base) == url
    assert completions_url(base, chat=True) == url.replace("/completions", "/chat/completions")


def test_openai_response_parsing_orders_choices_and_counts_tokens():
    body = {
        "choices": [
            {"index": 1, "text": "y", "logprobs": {"tokens": ["y", "<eos>"]}},
            {"index": 0, "text": "x", "logprobs": None},
        ],
        "usage": {"completion_tokens": 9},
    }
    assert parse_response(body, 2) == (["x", "y"], [0, 2], ["stop", "stop"])  # n > 1, no logprobs: count unknown
    single = {"choices": [{"index": 0, "text": "z", "finish_reason": "length"}], "usage": {"completion_tokens": 4}}
    assert parse_response(single, 1) == (["z"], [4], ["length"])
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "w"}, "finish_reason": "stop"}]}
    assert parse_response(chat, 1) == (["w"], [0], ["stop"])
    for bad in [{"data": []}, [], {"choices": [{"index": 0}]}]:
        with pytest.raises(ValueError):
            parse_response(bad, 1)
    with pytest.raises(ValueError, match="2 choices for n=3"):
        parse_response(body, 3)


# --- OpenAI-compatible: against a real server on 127.0.0.1 ----------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_gpt2(["0123456789+="], tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    with serve_completions(model_dir, api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def reference(model_dir):
    return TransformersSampler(str(model_dir), device="cpu", progress=False)


def remote(model_dir, server, **options) -> OpenAISampler:
    options = {"api_key": API_KEY, "retry_backoff": 0.01, "progress": False} | options
    return OpenAISampler(str(model_dir), base_url=server.base_url, **options)


def test_openai_sampler_returns_n_completions_per_prompt_in_order(model_dir, server, reference):
    ids = [3, 8, 5]
    got = remote(model_dir, server, concurrency=2).generate(PROMPTS, 4, PARAMS, prompt_ids=ids)
    for prompt, pid, row in zip(PROMPTS, ids, got.completions, strict=True):
        request_params = SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.max_new_tokens, row_seed(7, pid, 0))
        assert row == reference.generate([prompt], 4, request_params, prompt_ids=[0]).completions[0]
    assert got.num_tokens == [[0] * 4] * 3  # n > 1 without logprobs: per-sample counts are unknown

    single = remote(model_dir, server).generate(PROMPTS, 1, PARAMS)
    for i, (prompt, counts) in enumerate(zip(PROMPTS, single.num_tokens, strict=True)):
        request_params = SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.max_new_tokens, row_seed(7, i, 0))
        assert counts == reference.generate([prompt], 1, request_params, prompt_ids=[0]).num_tokens[0]
    assert all(t > 0 for row in single.num_tokens for t in row)


def test_openai_sampler_is_seeded_and_independent_of_batching(model_dir, server):
    sampler = remote(model_dir, server, concurrency=3)
    first = sampler.generate(PROMPTS, 3, PARAMS)
    assert sampler.generate(PROMPTS, 3, PARAMS).completions == first.completions
    alone = remote(model_dir, server, concurrency=1).generate(PROMPTS[2:], 3, PARAMS, prompt_ids=[2])
    assert alone.completions == first.completions[2:]
    other_seed = SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.max_new_tokens, seed=8)
    assert sampler.generate(PROMPTS, 3, other_seed).completions != first.completions


def test_openai_sampler_reports_the_samples_it_has_drawn(model_dir, server):
    """Progress where no bar is drawn (alignment.progress), counted as the server's answers come back."""
    from alignment.progress import reporting

    reports = []
    with reporting(lambda *args: reports.append(args), every=0):
        remote(model_dir, server, concurrency=1).generate(PROMPTS, 2, PARAMS)
    assert [(done, total, unit) for done, total, unit, _, _ in reports] == [(2, 6, "samples"), (4, 6, "samples")]


def test_openai_sampler_retries_injected_503s_then_succeeds(model_dir, server, caplog):
    server.state.fail_next, before = 2, server.state.requests_seen
    got = remote(model_dir, server, concurrency=1, max_retries=3).generate(PROMPTS, 2, PARAMS)
    assert [len(row) for row in got.completions] == [2, 2, 2]
    assert server.state.requests_seen - before == 2 + len(PROMPTS)
    assert "HTTP 503" in caplog.text and API_KEY not in caplog.text


def test_openai_sampler_gives_up_after_max_retries_in_one_sentence(model_dir, server):
    server.state.fail_next = 100
    try:
        with pytest.raises(RemoteSamplerError) as err:
            remote(model_dir, server, concurrency=1, max_retries=1).generate(PROMPTS[:1], 2, PARAMS)
    finally:
        server.state.fail_next = 0
    message = str(err.value)
    assert "HTTP 503" in message and "after 2 attempts" in message and server.base_url in message
    assert_one_sentence(message)


def test_openai_sampler_wrong_api_key_is_one_sentence_without_the_key(model_dir, server):
    wrong = "sk-wrong-key-0a1b2c3d"
    with pytest.raises(RemoteSamplerError) as err:
        remote(model_dir, server, api_key=wrong).generate(PROMPTS, 2, PARAMS)
    message = str(err.value)
    assert "HTTP 401" in message and "OPENAI_API_KEY" in message
    assert wrong not in message and "0a1b2c3d" not in message
    assert_one_sentence(message)


def test_openai_sampler_reads_the_key_from_the_environment_at_call_time(model_dir, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    sampler = make_sampler("openai", str(model_dir), base_url=server.base_url, retry_backoff=0.01, progress=False)
    with pytest.raises(RemoteSamplerError, match="no API key was sent"):
        sampler.generate(PROMPTS[:1], 1, PARAMS)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    assert len(sampler.generate(PROMPTS[:1], 2, PARAMS).completions[0]) == 2


def test_openai_sampler_unknown_model_names_it(model_dir, server):
    with pytest.raises(RemoteSamplerError) as err:
        remote(model_dir, server, model="no-such-model").generate(PROMPTS[:1], 1, PARAMS)
    assert "HTTP 404" in str(err.value) and "'no-such-model'" in str(err.value)
    assert_one_sentence(str(err.value))


def test_openai_sampler_unreachable_endpoint_fails_fast_in_one_sentence(model_dir):
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    sampler = OpenAISampler(
        str(model_dir), base_url=base_url, max_retries=2, retry_backoff=0.01, timeout=5, progress=False
    )
    start = time.monotonic()
    with pytest.raises(RemoteSamplerError) as err:
        sampler.generate(PROMPTS, 2, PARAMS)
    assert time.monotonic() - start < 15  # a bound on retries, not a benchmark
    message = str(err.value)
    assert f"Could not reach {base_url}/chat/completions after 3 attempts" in message  # the model has a chat template
    assert_one_sentence(message)


# --- the prompt format on the remote paths ---------------------------------------------------------


def test_vllm_requests_carry_token_ids_every_end_id_and_stop_strings(model_dir):
    from alignment.models import load_policy
    from alignment.prompting import formatter_for

    model, tok = load_policy(model_dir, device="cpu")
    fmt = formatter_for(model, tok, {"stop": ["+"]})
    [request] = build_vllm_requests(["12+3="], 2, PARAMS, formatter=fmt)
    assert request["prompt"] == {"prompt_token_ids": fmt.prompt_ids("12+3=")}
    assert tok.decode(request["prompt"]["prompt_token_ids"]) == tok.apply_chat_template(
        [{"role": "user", "content": "12+3="}], add_generation_prompt=True, tokenize=False
    )
    assert set(request["sampling_params"]["stop_token_ids"]) == set(model.generation_config.eos_token_id)
    assert request["sampling_params"]["stop"] == ["+"]
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(index=0, text="1", token_ids=[1], finish_reason="length")])]
    assert parse_outputs(outputs, 1).finish_reasons == [["length"]]


def test_openai_sampler_raw_format_uses_completions_and_matches_the_raw_transformers_sampler(model_dir, server):
    raw = {"format": "raw"}
    got = remote(model_dir, server, prompt=raw).generate(PROMPTS, 1, PARAMS)
    assert remote(model_dir, server, prompt=raw).url.endswith("/v1/completions")
    local = TransformersSampler(str(model_dir), device="cpu", progress=False, prompt=raw)
    for i, (prompt, row) in enumerate(zip(PROMPTS, got.completions, strict=True)):
        request_params = SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.max_new_tokens, row_seed(7, i, 0))
        assert row == local.generate([prompt], 1, request_params, prompt_ids=[0]).completions[0]


def test_openai_sampler_chat_reports_finish_reasons_and_applies_stop_strings(model_dir, server, reference):
    sampler = remote(model_dir, server)
    assert sampler.url.endswith("/v1/chat/completions")
    got = sampler.generate(PROMPTS, 3, PARAMS)
    assert {r for row in got.finish_reasons for r in row} <= {"stop", "length"}
    want = reference.generate(PROMPTS[:1], 3, SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.max_new_tokens,
                                                               row_seed(7, 0, 0)), prompt_ids=[0])
    assert got.finish_reasons[0] == want.finish_reasons[0]
    cut = remote(model_dir, server, prompt={"stop": ["1"]}).generate(PROMPTS, 3, PARAMS)
    assert all("1" not in t for row in cut.completions for t in row)


# --- servers that ignore n (transformers serve answers one choice whatever n is) ----------------------


def test_openai_requests_split_by_n_per_request_are_seeded_by_their_first_sample():
    bodies = build_requests(["a", "b"], 4, PARAMS, "served", prompt_ids=[4, 9], per_request=3)
    assert [(b["prompt"], b["n"], b["seed"]) for b in bodies] == [
        ("a", 3, row_seed(7, 4, 0)), ("a", 1, row_seed(7, 4, 3)), ("b", 3, row_seed(7, 9, 0)), ("b", 1, row_seed(7, 9, 3)),
    ]
    assert [b["seed"] for b in build_requests(["a"], 3, PARAMS, "served", per_request=1)] == [row_seed(7, 0, k) for k in range(3)]


def test_openai_response_with_fewer_choices_than_n_is_told_apart():
    one = {"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}], "usage": {"completion_tokens": 2}}
    with pytest.raises(FewerChoices, match="1 choices for n=4"):
        parse_response(one, 4)
    with pytest.raises(ValueError) as err:
        parse_response({"choices": []}, 2)
    assert not isinstance(err.value, FewerChoices)


@pytest.mark.parametrize(
    "options, named",
    [({"n_per_request": 0}, "n_per_request"), ({"n_per_request": "all"}, "n_per_request"),
     ({"concurrency": True}, "concurrency"), ({"timeout": 0}, "timeout"), ({"extra_body": {"n": 2}}, "extra_body")],
)
def test_openai_option_values_are_checked_before_a_run(options, named):
    from alignment.errors import ConfigError
    from alignment.samplers import check_options

    with pytest.raises(ConfigError) as err:
        check_options("openai", {"base_url": "http://127.0.0.1:9/v1", **options})
    assert f"grow.sampler_options.{named}" in str(err.value)
    assert_one_sentence(str(err.value))
    check_options("openai", {"base_url": "http://127.0.0.1:9/v1", "n_per_request": None, "concurrency": 2})


@pytest.fixture(scope="module")
def ignoring_server(model_dir):
    with serve_completions(model_dir, api_key=API_KEY, ignores_n=True) as running:
        yield running


def per_sample_reference(reference, prompts, ids, n, params=PARAMS):
    """What one request per sample gives: sample k of a prompt seeded row_seed(seed, prompt_id, k)."""
    texts, counts = [], []
    for prompt, pid in zip(prompts, ids, strict=True):
        rows = [reference.generate([prompt], 1, SamplingParams(params.temperature, params.top_p, params.max_new_tokens,
                                                               row_seed(params.seed, pid, k)), prompt_ids=[0]) for k in range(n)]
        texts.append([r.completions[0][0] for r in rows])
        counts.append([r.num_tokens[0][0] for r in rows])
    return texts, counts


def test_a_server_that_ignores_n_gets_one_request_per_sample(model_dir, server, ignoring_server, reference, caplog):
    ids = [3, 8, 5]
    sampler = remote(model_dir, ignoring_server, concurrency=2)
    got = sampler.generate(PROMPTS, 4, PARAMS, prompt_ids=ids)
    want_texts, want_counts = per_sample_reference(reference, PROMPTS, ids, 4)
    assert got.completions == want_texts and [len(row) for row in got.completions] == [4, 4, 4]
    assert got.num_tokens == want_counts and all(t > 0 for row in got.num_tokens for t in row)  # usage per sample
    assert all(len(set(row)) > 1 for row in got.completions)  # each sample its own seed: distinct at temperature 1
    assert sampler.ignores_n

    # Remembered for the sampler's life: the next call asks one sample per request from the start, and
    # the log says it once.
    before = ignoring_server.state.requests_seen
    again = sampler.generate(PROMPTS, 4, PARAMS, prompt_ids=ids)
    assert ignoring_server.state.requests_seen - before == 3 * 4
    assert again.completions == got.completions and again.num_tokens == got.num_tokens
    other = SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.max_new_tokens, seed=8)
    assert sampler.generate(PROMPTS, 4, other, prompt_ids=ids).completions != got.completions
    said = [r for r in caplog.records if "ignores n" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING" and ignoring_server.base_url in said[0].getMessage()

    # A fresh sampler with the same seed gives the same samples; n_per_request=1 gives them without the
    # detour, on this server and on one that honours n.
    assert remote(model_dir, ignoring_server).generate(PROMPTS, 4, PARAMS, prompt_ids=ids).completions == got.completions
    for srv in (ignoring_server, server):
        before = srv.state.requests_seen
        forced = remote(model_dir, srv, n_per_request=1, concurrency=3).generate(PROMPTS, 4, PARAMS, prompt_ids=ids)
        assert srv.state.requests_seen - before == 3 * 4
        assert (forced.completions, forced.num_tokens, forced.finish_reasons) == (got.completions, got.num_tokens, got.finish_reasons)
    assert len([r for r in caplog.records if "ignores n" in r.getMessage()]) == 2  # once more, by the fresh sampler


def test_n_per_request_splits_a_prompt_into_seeded_requests(model_dir, server, reference):
    before = server.state.requests_seen
    got = remote(model_dir, server, n_per_request=3).generate(PROMPTS[:2], 4, PARAMS, prompt_ids=[3, 8])
    assert server.state.requests_seen - before == 2 * 2
    for prompt, pid, row in zip(PROMPTS[:2], [3, 8], got.completions, strict=True):
        head = reference.generate([prompt], 3, SamplingParams(1.0, 0.95, 6, row_seed(7, pid, 0)), prompt_ids=[0])
        tail = reference.generate([prompt], 1, SamplingParams(1.0, 0.95, 6, row_seed(7, pid, 3)), prompt_ids=[0])
        assert row == head.completions[0] + tail.completions[0]


def test_flywheel_run_grows_four_samples_per_prompt_from_a_server_that_ignores_n(tiny_model_dir, tmp_path):
    """``flywheel run`` in a subprocess, Grow through the test server in its ignores-n mode."""
    root = Path(__file__).resolve().parents[1]
    sets = ["task.n_labelled=40", "task.n_prompts=24", "task.n_eval=16", "grow_steps=1", "grow.samples_per_prompt=4",
            "improve.epochs=1", f"model.path={tiny_model_dir}", "warm_start.enabled=false", "grow.sampler=openai",
            f"lake=file://{tmp_path / 'lake'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    with serve_completions(tiny_model_dir, ignores_n=True) as srv:
        argv = [sys.executable, "-m", "flows.cli", "run", str(root / "recipes" / "arithmetic-rest.yaml"), "--run-name", "ignores-n"]
        for s in [*sets, f"grow.sampler_options.base_url={srv.base_url}"]:
            argv += ["--set", s]
        proc = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        served = srv.state.requests_seen
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    scored = pl.read_parquet(list((tmp_path / "lake" / "scored" / "run=ignores-n" / "iteration=1").glob("*.parquet")))
    grown = scored.filter(pl.col("sample_idx") >= 0)
    per_prompt = grown.group_by("prompt_id").agg(pl.len().alias("n"), pl.col("sample_idx").sort().alias("idx"))
    assert per_prompt.height == 24 and set(per_prompt["n"]) == {4}
    assert all(idx.to_list() == [0, 1, 2, 3] for idx in per_prompt["idx"])
    assert (grown["num_tokens"] > 0).all()  # each sample's own usage
    assert 24 * 4 <= served <= 24 * 4 + 8  # one request per sample, after at most `concurrency` asking for n=4
    log = (tmp_path / ".flywheel" / "logs" / "ignores-n.log").read_text()
    assert log.count("ignores n") == 1 and "Traceback" not in proc.stderr
