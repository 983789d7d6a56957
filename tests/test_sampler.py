"""The transformers sampler: seeded, reproducible whatever the batching, n samples per prompt, exact greedy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alignment.models import load_policy
from alignment.samplers import SamplingParams, make_sampler, row_seed
from alignment.samplers.hf import TransformersSampler, counter_uniform

PROMPTS = ["1+2=", "37+5=", "99+9=", "0+0=", "5+4=", "61+3="]  # different lengths: batches need padding
IDS = [10, 11, 12, 13, 14, 15]
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=6, seed=7)


@pytest.fixture(scope="module")
def sampler(tiny_model_dir):
    return TransformersSampler(str(tiny_model_dir), batch_size=256, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(sampler):
    return sampler.generate(PROMPTS, 4, PARAMS, IDS)


def test_n_samples_per_prompt_with_token_counts(reference):
    assert len(reference.completions) == len(PROMPTS) and len(reference.num_tokens) == len(PROMPTS)
    for texts, counts in zip(reference.completions, reference.num_tokens, strict=True):
        assert len(texts) == 4 and len(counts) == 4
        assert all(isinstance(t, str) for t in texts)
        # One token per character; special tokens (eos, pad) count but are not in the text.
        assert all(len(t) <= c <= PARAMS.max_new_tokens for t, c in zip(texts, counts, strict=True))
    # A randomly initialised policy at temperature 1 gives varied samples.
    assert len({t for row in reference.completions for t in row}) > len(PROMPTS)


def test_same_seed_same_samples(sampler, reference):
    again = sampler.generate(PROMPTS, 4, PARAMS, IDS)
    assert again.completions == reference.completions
    assert again.num_tokens == reference.num_tokens


def test_a_fresh_sampler_reproduces_the_samples(tiny_model_dir, reference):
    fresh = make_sampler("transformers", str(tiny_model_dir), device="cpu", progress=False)
    assert fresh.generate(PROMPTS, 4, PARAMS, IDS).completions == reference.completions


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_samples_do_not_depend_on_batch_size(tiny_model_dir, reference, batch_size):
    small = TransformersSampler(str(tiny_model_dir), batch_size=batch_size, device="cpu", progress=False)
    out = small.generate(PROMPTS, 4, PARAMS, IDS)
    assert out.completions == reference.completions
    assert out.num_tokens == reference.num_tokens


def test_samples_follow_the_prompt_id_not_its_position(sampler, reference):
    order = [4, 0, 5, 2, 1, 3]
    shuffled = sampler.generate([PROMPTS[i] for i in order], 4, PARAMS, [IDS[i] for i in order])
    assert shuffled.completions == [reference.completions[i] for i in order]
    assert shuffled.num_tokens == [reference.num_tokens[i] for i in order]
    subset = sampler.generate([PROMPTS[5], PROMPTS[1]], 4, PARAMS, [IDS[5], IDS[1]])
    assert subset.completions == [reference.completions[5], reference.completions[1]]


def test_fewer_samples_are_a_prefix_of_more(sampler, reference):
    assert sampler.generate(PROMPTS, 2, PARAMS, IDS).completions == [row[:2] for row in reference.completions]


def test_without_prompt_ids_the_position_is_the_id(sampler):
    implicit = sampler.generate(PROMPTS, 2, PARAMS)
    explicit = sampler.generate(PROMPTS, 2, PARAMS, list(range(len(PROMPTS))))
    assert implicit.completions == explicit.completions


def test_different_seed_or_prompt_id_gives_different_samples(sampler, reference):
    other_seed = sampler.generate(PROMPTS, 4, SamplingParams(1.0, 1.0, PARAMS.max_new_tokens, seed=8), IDS)
    assert other_seed.completions != reference.completions
    other_ids = sampler.generate(PROMPTS, 4, PARAMS, [i + 100 for i in IDS])
    assert other_ids.completions != reference.completions
    # Per-sample seeds are distinct across seeds, prompts and sample indices.
    seeds = {row_seed(s, p, j) for s in range(3) for p in range(50) for j in range(8)}
    assert len(seeds) == 3 * 50 * 8


def _manual_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding by hand on the chat-templated prompt: argmax until any end id or the length limit."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = set(model.generation_config.eos_token_id)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] in ends:
                break
    return out


def test_greedy_is_deterministic_seed_free_and_matches_argmax_decoding(tiny_model_dir, sampler):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, seed=0)
    out = sampler.generate(PROMPTS, 3, greedy, IDS)
    assert sampler.generate(PROMPTS, 3, SamplingParams(0.0, 1.0, 6, seed=99), [0] * len(PROMPTS)).completions == out.completions
    model, tokenizer = load_policy(tiny_model_dir, device="cpu")
    for prompt, texts, counts in zip(PROMPTS, out.completions, out.num_tokens, strict=True):
        expected = _manual_greedy(model, tokenizer, prompt, greedy.max_new_tokens)
        assert texts == [tokenizer.decode(expected, skip_special_tokens=True)] * 3
        assert out.finish_reasons[PROMPTS.index(prompt)] == ["stop" if len(expected) < 6 or expected[-1] in model.generation_config.eos_token_id else "length"] * 3
        assert counts == [len(expected)] * 3


def test_top_p_that_keeps_one_token_is_greedy(sampler):
    greedy = sampler.generate(PROMPTS, 1, SamplingParams(0.0, 1.0, 6), IDS)
    nucleus = sampler.generate(PROMPTS, 3, SamplingParams(1.0, 1e-6, 6, seed=3), IDS)
    assert nucleus.completions == [row * 3 for row in greedy.completions]


def test_first_token_frequencies_follow_softmax_of_logits_over_temperature(tiny_model_dir, tmp_path):
    # Sharpen the random model so its next-token distribution is far from uniform.
    model, tokenizer = load_policy(tiny_model_dir, device="cpu")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25.0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    # Raw prompts: the sharpened model would otherwise only echo the template's last token.
    prompt, temperature, n = "37+5=", 0.7, 3000
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])).logits[0, -1]
    probs = torch.softmax(logits / temperature, dim=-1)
    assert probs.max() > 0.2, "the sharpened model should not be near-uniform"

    sharp = TransformersSampler(str(tmp_path), batch_size=1024, device="cpu", progress=False, prompt={"format": "raw"})
    gen = sharp.generate([prompt], n, SamplingParams(temperature, 1.0, 1, seed=0), [0])
    assert gen.num_tokens == [[1] * n]
    vocab = tokenizer.get_vocab()
    for token, token_id in vocab.items():
        if token_id in tokenizer.all_special_ids:
            continue
        freq = sum(t == token for t in gen.completions[0]) / n
        # 5 standard deviations of a binomial frequency at n = 3000 is at most 0.046.
        assert abs(freq - float(probs[token_id])) < 0.046, (token, freq, float(probs[token_id]))


def test_counter_noise_depends_only_on_row_key_step_and_token():
    keys = torch.tensor([row_seed(7, p, j) for p in range(6) for j in range(4)])
    u = counter_uniform(keys, 3, 1000)
    assert u.shape == (24, 1000) and 0.0 < float(u.min()) and float(u.max()) < 1.0
    # A row alone, or among other rows in another order, gets exactly the same noise.
    assert torch.equal(counter_uniform(keys[5:6], 3, 1000)[0], u[5])
    assert torch.equal(counter_uniform(keys.flip(0), 3, 1000).flip(0), u)
    # Another step or another row is fresh noise; the values are uniform (mean 1/2, variance 1/12).
    assert (counter_uniform(keys, 4, 1000) == u).float().mean() < 0.01
    assert (u[0] == u[1]).float().mean() < 0.01
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


def _forced_logps(model, prompt_ids: list[int], ids: list[int]) -> list[float]:
    """Each of ``ids``' log-probs after ``prompt_ids`` from one teacher-forced pass of ``model``, by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
    return logits.float().log_softmax(-1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(0.0, 1.0, 6, logprobs=True),            # greedy, as evaluation asks
    SamplingParams(0.7, 0.9, 6, seed=7, logprobs=True),    # temperature, top-p and noise change the choice, not log π
    SamplingParams(0.0, 1.0, 2, logprobs=True),            # cut at max_new_tokens: no end token
    SamplingParams(1.0, 1.0, 6, seed=7, logprobs=True),    # prompt.stop cuts the text; the ids keep the stop string
], ids=["greedy", "sampled", "truncated", "stop-string"])
def test_log_probs_come_with_the_samples_and_are_the_models(tiny_model_dir, params, request):
    prompt = {"stop": ["2"]} if request.node.callspec.id == "stop-string" else None
    sampler = TransformersSampler(str(tiny_model_dir), batch_size=5, device="cpu", progress=False, prompt=prompt)
    plain = sampler.generate(PROMPTS, 2, dataclasses.replace(params, logprobs=False), IDS)
    out = sampler.generate(PROMPTS, 2, params, IDS)
    # Asking for log-probs changes no sample, and without asking there are none.
    assert (out.completions, out.num_tokens, out.finish_reasons) == (plain.completions, plain.num_tokens, plain.finish_reasons)
    assert plain.prompt_token_ids == plain.token_ids == plain.token_logps == []
    assert out.prompt_token_ids == [sampler.formatter.prompt_ids(p) for p in PROMPTS]  # what the model was given
    if request.node.callspec.id == "truncated":
        assert {r for row in out.finish_reasons for r in row} == {"length"}
    if request.node.callspec.id == "stop-string":
        decoded = [sampler.formatter.decode(ids) for row in out.token_ids for ids in row]
        assert any(d != c and d.startswith(c) and "2" in d for d, c in zip(decoded, sum(out.completions, []), strict=True))
    checked = 0
    for i in range(len(PROMPTS)):
        for j in range(2):
            ids, logps = out.token_ids[i][j], out.token_logps[i][j]
            assert len(ids) == len(logps) == out.num_tokens[i][j]
            assert sampler.formatter.decode(ids).startswith(out.completions[i][j])
            # log π(token | prompt, earlier tokens), as a teacher-forced pass of the model gives it.
            assert logps == pytest.approx(_forced_logps(sampler.model, out.prompt_token_ids[i], ids), abs=1e-5)
            checked += len(ids)
    assert checked > len(PROMPTS) * 2


def test_log_probs_do_not_depend_on_batch_size(tiny_model_dir, sampler):
    params = SamplingParams(1.0, 1.0, 6, seed=3, logprobs=True)
    one = TransformersSampler(str(tiny_model_dir), batch_size=1, device="cpu", progress=False).generate(PROMPTS, 3, params, IDS)
    many = sampler.generate(PROMPTS, 3, params, IDS)
    assert one.token_ids == many.token_ids
    for a, b in zip(one.token_logps, many.token_logps, strict=True):
        assert [x for row in a for x in row] == pytest.approx([x for row in b for x in row], abs=1e-5)


def test_a_teacher_forced_pass_over_the_generated_ids_gives_their_log_probs(tiny_model_dir, sampler):
    """What makes a policy's held-out KL to a reference one pass of the reference: ``completion_logps`` of the
    policy itself over its generated ids is the sum of the log-probs generation returned (KL to itself 0)."""
    from alignment.evaluation import completion_logps

    out = sampler.generate(PROMPTS, 2, SamplingParams(0.0, 1.0, 4, logprobs=True), IDS)
    prompt_ids = [p for p in out.prompt_token_ids for _ in range(2)]
    ids = [row for sample in out.token_ids for row in sample]
    forced = completion_logps(sampler.model, prompt_ids, ids, pad_id=sampler.formatter.pad_id, batch_size=3)
    assert forced == pytest.approx([sum(row) for sample in out.token_logps for row in sample], abs=1e-5)
    # A different model scores the same ids differently: the sums are a function of the model, not of the ids alone.
    other, _ = load_policy(tiny_model_dir, device="cpu")
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(3.0)
    other_logps = completion_logps(other, prompt_ids, ids, pad_id=sampler.formatter.pad_id, batch_size=3)
    assert other_logps != pytest.approx(forced, abs=1e-3)
