"""The fast paths change no result: the sampler's shared-prompt cache and the log-prob pass that skips padding.

The transformers sampler runs each distinct prompt's prefix once and decodes its n samples from a
preallocated cache; ``batch_logps`` runs rows in length groups and keeps only the logits that predict a
label. Each is checked here against the plain computation it replaces.
"""

from __future__ import annotations

import pytest
import torch

from alignment.logprobs import _length_groups, batch_logps
from alignment.models import build_tiny_gpt2, load_policy
from alignment.samplers import SamplingParams
from alignment.samplers.hf import TransformersSampler, _left_pad, _PreallocatedLayer
from alignment.training import collate, encode_pairs

PROMPTS = ["1+2=", "37+5=", "99+9=", "1+2=", "5+4=", "61+3=", "7"]  # a repeated prompt, and a one-character one
IDS = [10, 11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return build_tiny_gpt2(["0123456789+="], tmp_path_factory.mktemp("tiny-gpt2") / "model")


def _plain(sampler: TransformersSampler, monkeypatch) -> None:
    """Make ``sampler`` hand plain ``generate`` the padded batch, as before the shared-prompt cache."""
    monkeypatch.setattr(sampler, "_shared_prefix_cache", lambda *args: None)


@pytest.mark.parametrize("fmt", [None, {"format": "raw"}])
@pytest.mark.parametrize("params", [SamplingParams(1.0, 0.9, 7, seed=3), SamplingParams(0.7, 1.0, 7, seed=4), SamplingParams(0.0, 1.0, 7)])
def test_shared_prompt_cache_samples_what_plain_generate_samples(tiny_model_dir, monkeypatch, fmt, params):
    fast = TransformersSampler(str(tiny_model_dir), batch_size=5, device="cpu", progress=False, prompt=fmt)
    assert fast._shared_prefix_cache([[1, 2, 3], [4, 5]], 3, 4) is not None  # the Llama takes the fast path
    got = fast.generate(PROMPTS, 3, params, IDS)
    plain = TransformersSampler(str(tiny_model_dir), batch_size=5, device="cpu", progress=False, prompt=fmt)
    _plain(plain, monkeypatch)
    want = plain.generate(PROMPTS, 3, params, IDS)
    assert (got.completions, got.num_tokens, got.finish_reasons) == (want.completions, want.num_tokens, want.finish_reasons)


def test_shared_prompt_cache_on_learned_positions(gpt2_dir, monkeypatch):
    params = SamplingParams(1.0, 1.0, 6, seed=1)
    fast = TransformersSampler(str(gpt2_dir), batch_size=4, device="cpu", progress=False, prompt={"format": "raw"})
    assert fast._shared_prefix_cache([[1, 2, 3], [4, 5]], 3, 4) is not None
    got = fast.generate(PROMPTS, 2, params, IDS)
    _plain(fast, monkeypatch)
    assert fast.generate(PROMPTS, 2, params, IDS).completions == got.completions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_cache_gives_the_logits_of_the_full_padded_pass(tiny_model_dir, gpt2_dir, arch):
    """Decoding from the cache gives, step after step, the logits of a full pass over the padded batch."""
    path = tiny_model_dir if arch == "llama" else gpt2_dir
    sampler = TransformersSampler(str(path), device="cpu", progress=False, prompt={"format": "raw"})
    model = sampler.model
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)  # sharpen the random model: position errors show
    seqs = [sampler.formatter.prompt_ids(p) for p in ["1+2=", "7", "37+5=", "1+2=", "123+456=", "9+9="]]
    ids, mask = _left_pad(seqs, sampler.formatter.pad_id, model.device)
    cache = sampler._shared_prefix_cache(seqs, ids.shape[1], 3)
    assert cache is not None
    step_ids = ids[:, -1:]
    with torch.no_grad():
        for _ in range(3):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            fast = model(input_ids=step_ids, attention_mask=mask, position_ids=positions[:, -1:], past_key_values=cache)
            assert torch.allclose(fast.logits[:, -1], full, atol=1e-4), (arch, (fast.logits[:, -1] - full).abs().max())
            step_ids = full.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, step_ids], 1), torch.cat([mask, torch.ones_like(step_ids)], 1)


def test_preallocated_layer_matches_concatenation_and_grows():
    torch.manual_seed(0)
    first, steps = torch.randn(3, 2, 4, 8), [torch.randn(3, 2, 1, 8) for _ in range(5)]
    buffer = torch.zeros(3, 2, 6, 8)  # room for 2 more columns: the third step must grow it
    buffer[:, :, :4] = first
    layer = _PreallocatedLayer(buffer, buffer.clone(), 4)
    expected = first
    for step in steps:
        keys, values = layer.update(step, step)
        expected = torch.cat([expected, step], dim=-2)
        assert torch.equal(keys, expected) and torch.equal(values, expected)
    assert layer.get_seq_length() == 9


def test_length_groups_cover_every_row_once():
    lengths = [142, 319, 151, 307, 181, 184, 274, 154, 200, 233, 240, 243, 264, 267, 188, 193]
    groups = _length_groups(lengths)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths))) and len(groups) > 1
    for g in groups:
        assert len(g) * max(lengths[r] for r in g) <= 1.1 * sum(lengths[r] for r in g)
    assert _length_groups([10, 10, 11]) == [[0, 1, 2]]  # little padding: one pass


def test_batch_logps_without_padding_equals_one_padded_pass(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir, device="cpu")
    model.train()
    prompts = ["1+2=", "37+5=", "999+999=", "5+4=", "1+1=", "12+34="]
    answers = ["3", "42", "1998 and then a long tail of digits 0123456789", "9", "2 2 2 2 2 2 2 2 2 2 2 2 2", "46"]
    batch = collate(encode_pairs(tokenizer, prompts, answers), tokenizer.pad_token_id)
    assert len(_length_groups(batch["attention_mask"].sum(1).tolist())) > 1  # the grouped path runs

    def plain_logps():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        logp = logits.log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (labels != -100)).sum(-1), (labels != -100).sum(-1)

    want, want_len = plain_logps()
    want.sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got, got_len = batch_logps(model, batch)
    got.sum().backward()
    assert torch.equal(got_len, want_len)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want_grads[name], atol=1e-5, rtol=1e-4), name

    # Left padding (not what collate makes) takes one full pass: the same as the plain computation.
    shift = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)
    batch = {k: torch.stack([row.roll(int(s)) for row, s in zip(v, shift, strict=True)]) for k, v in batch.items()}
    with torch.no_grad():
        want, want_len = plain_logps()
        got, got_len = batch_logps(model, batch)
    assert torch.equal(got_len, want_len) and torch.allclose(got, want, atol=1e-4, rtol=1e-5)
