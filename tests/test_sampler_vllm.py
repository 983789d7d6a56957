"""The vLLM sampler. vLLM cannot run on this CPU-only machine, so its request building and output
parsing run against ``FakeVLLMEngineDouble``, a stand-in for the ``vllm.LLM`` engine object alone;
the end-to-end test runs only on GPU workers with vLLM installed."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from alignment.models import build_tiny_gpt2
from alignment.samplers import SamplingParams, make_sampler, row_seed
from alignment.samplers.vllm import VLLMSampler, parse_outputs
from alignment.samplers.vllm import build_requests as build_vllm_requests

PROMPTS = ["12+3=", "7+4=", "90+9="]
PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=7)


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith("."), message


# --- vLLM: pure request building and parsing ------------------------------------------------


class FakeVLLMEngineDouble:
    """Test double for the ``vllm.LLM`` engine object only: vLLM cannot run on this CPU-only machine.

    Its samples are a function of (prompt, per-sample seed) and it returns them out of index order,
    as a real engine may, so the sampler's seeding and reordering are what the tests observe.
    """

    def __init__(self):
        self.calls: list[tuple[list[str], list[dict], bool]] = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((list(prompts), list(sampling_params), use_tqdm))
        outputs = [
            SimpleNamespace(prompt=p, outputs=[self._sample(p, sp, k) for k in reversed(range(sp["n"]))])
            for p, sp in zip(prompts, sampling_params, strict=True)
        ]
        if callable(use_tqdm):  # as vLLM's engine loop: a bar over every sample, advanced as each request finishes
            bar = use_tqdm(total=sum(sp["n"] for sp in sampling_params), desc="Processed prompts", dynamic_ncols=True)
            for out in outputs:
                bar.update(len(out.outputs))
            bar.close()
        return outputs

    @staticmethod
    def _sample(prompt: str, sp: dict, k: int) -> SimpleNamespace:
        text = f"{prompt}|{(sp['seed'] + k) % 1000}"[: sp["max_tokens"] + len(prompt)]
        return SimpleNamespace(index=k, text=text, token_ids=list(range(len(text) - len(prompt))))


def test_vllm_requests_carry_one_seed_per_prompt_id():
    requests = build_vllm_requests(["a", "b"], 4, PARAMS, prompt_ids=[10, 3])
    assert requests == [
        {
            "prompt": prompt,
            "sampling_params": {
                "n": 4, "seed": row_seed(7, pid, 0), "temperature": 1.0, "top_p": 0.95, "max_tokens": 6
            },
        }
        for prompt, pid in [("a", 10), ("b", 3)]
    ]
    assert [r["sampling_params"]["seed"] for r in build_vllm_requests(["a", "b"], 1, PARAMS)] == [
        row_seed(7, 0, 0),
        row_seed(7, 1, 0),
    ]


@pytest.mark.parametrize("n, ids", [(0, None), (2, [1])])
def test_vllm_requests_reject_bad_arguments(n, ids):
    with pytest.raises(ValueError) as err:
        build_vllm_requests(["a", "b"], n, PARAMS, prompt_ids=ids)
    assert_one_sentence(str(err.value))


def test_vllm_outputs_are_ordered_by_sample_index_with_token_counts():
    sample = lambda k, text, n_tok: SimpleNamespace(index=k, text=text, token_ids=[0] * n_tok)  # noqa: E731
    outputs = [
        SimpleNamespace(outputs=[sample(1, "b1", 3), sample(0, "b0", 2)]),
        SimpleNamespace(outputs=[sample(0, "c0", 5), sample(1, "c1", 1)]),
    ]
    generation = parse_outputs(outputs, 2)
    assert generation.completions == [["b0", "b1"], ["c0", "c1"]]
    assert generation.num_tokens == [[2, 3], [5, 1]]
    with pytest.raises(RuntimeError, match="returned 2 samples for prompt 0, expected 3"):
        parse_outputs(outputs, 3)


def test_vllm_sampler_sends_one_batch_and_is_independent_of_batching():
    engine = FakeVLLMEngineDouble()
    sampler = VLLMSampler.from_engine(engine, make_params=dict)
    full = sampler.generate(PROMPTS, 3, PARAMS, prompt_ids=[5, 6, 7])
    alone = sampler.generate(PROMPTS[2:], 3, PARAMS, prompt_ids=[7])
    assert len(engine.calls) == 2 and engine.calls[0][0] == PROMPTS and engine.calls[0][2] is False
    base = row_seed(7, 7, 0)
    assert full.completions[2] == [f"90+9=|{(base + k) % 1000}"[:11] for k in range(3)]
    assert alone.completions == full.completions[2:] and alone.num_tokens == full.num_tokens[2:]
    assert [len(row) for row in full.completions] == [3, 3, 3]
    assert sampler.generate([], 3, PARAMS).completions == [] and len(engine.calls) == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_sampling_reports_its_samples_inside_a_progress_block():
    """vLLM draws its own bar; inside a stage's progress block the sampler hands it a bar class that also counts
    the samples for the stage's progress lines (outside one, vLLM gets the plain switch)."""
    from alignment.progress import reporting

    engine, reports = FakeVLLMEngineDouble(), []
    sampler = VLLMSampler.from_engine(engine, make_params=dict)
    with reporting(lambda *args: reports.append(args), every=0):
        sampler.generate(PROMPTS, 3, PARAMS, prompt_ids=[5, 6, 7])
    assert [(done, total, unit) for done, total, unit, _, _ in reports] == [(3, 9, "samples"), (6, 9, "samples")]
    assert callable(engine.calls[0][2])
    sampler.generate(PROMPTS, 3, PARAMS, prompt_ids=[5, 6, 7])
    assert engine.calls[1][2] is False and len(reports) == 2


def test_vllm_missing_says_how_to_install_it():
    with pytest.raises(ImportError) as err:
        make_sampler("vllm", "/nonexistent/model")
    assert "flywheel[gpu]" in str(err.value)
    assert_one_sentence(str(err.value))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="vLLM needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (GPU workers only)")
def test_vllm_end_to_end_on_a_tiny_model(tmp_path):
    # head size 32 and float32 keep every attention backend and the comparison exact enough
    model = build_tiny_gpt2(PROMPTS, tmp_path / "model", n_embd=128, n_head=4)
    sampler = VLLMSampler(
        str(model), dtype="float32", gpu_memory_utilization=0.2, max_model_len=64, enforce_eager=True, progress=False
    )
    first = sampler.generate(PROMPTS, 4, PARAMS)
    again = sampler.generate(PROMPTS, 4, PARAMS)
    assert [len(row) for row in first.completions] == [4, 4, 4]
    assert first.completions == again.completions
    assert all(0 < t <= PARAMS.max_new_tokens for row in first.num_tokens for t in row)
    assert sampler.generate(PROMPTS[1:2], 4, PARAMS, prompt_ids=[1]).completions == first.completions[1:2]
