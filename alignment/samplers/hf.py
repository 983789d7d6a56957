"""The ``transformers`` sampler: batched generation with per-sample seeds.

Sampling is Gumbel-max: ``argmax(logits / T + g)`` with ``g ~ Gumbel(0, 1)`` draws a token from
``softmax(logits / T)`` (restricted to the top-p nucleus when ``top_p < 1``). The noise is
counter-based: ``g[row, v]`` at decoding step ``t`` is a hash of ``(row seed, t, v)``, where the row seed
comes from ``(seed, prompt_id, sample_idx)``, computed for the whole batch with a few integer tensor
ops (no per-row random generators, so one step's noise costs the same on CPU and GPU whatever the
batch). A sample is therefore the same whatever the batch size, prompt order or shard it lands in —
the property that lets a resumed or sharded Grow reproduce an uninterrupted one row for row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from alignment.models import load_policy
from alignment.prompting import PromptFormat, formatter_for
from alignment.samplers import Generation, SamplingParams, request_ids, row_seed


class _GumbelNoise(LogitsProcessor):
    """Adds Gumbel noise that is a pure function of (row seed, step, token id); greedy decoding then samples exactly."""

    def __init__(self, seeds: list[int], prompt_width: int, device: torch.device):
        self.keys = torch.tensor([s & _MASK63 for s in seeds], dtype=torch.int64, device=device)
        self.prompt_width = prompt_width  # the step is the number of tokens generated so far

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        u = counter_uniform(self.keys, input_ids.shape[1] - self.prompt_width, scores.shape[-1])
        gumbel = u.log_().neg_().log_().neg_()
        return scores + gumbel.to(scores.dtype)


_MASK63 = 2**63 - 1


def _int(value: int, bits: int) -> int:
    """``value`` modulo 2**bits as a signed integer of that width (torch has no unsigned 32/64-bit arithmetic)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _shr(x: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Logical right shift of signed ``bits``-wide integers (torch's ``>>`` is arithmetic)."""
    return (x >> n) & ((1 << (bits - n)) - 1)


def counter_uniform(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform floats in (0, 1), shape ``(len(keys), vocab)``: element ``[r, v]`` depends only on ``(keys[r], step, v)``.

    Each row's key and the step go through splitmix64 (int64, one value per row); each
    ``(row, token)`` element then through a 32-bit integer hash (Wellons' ``lowbias32``, int32 ops, which
    vectorise on CPU and GPU alike). The top 23 bits make ``(k + 0.5) / 2**23``, exact in float32.
    """
    # splitmix64 of key + (step + 1) * golden, per row.
    x = keys + _int((step + 1) * 0x9E3779B97F4A7C15, 64)
    x = (x ^ _shr(x, 30, 64)) * _int(0xBF58476D1CE4E5B9, 64)
    x = (x ^ _shr(x, 27, 64)) * _int(0x94D049BB133111EB, 64)
    x = x ^ _shr(x, 31, 64)
    row = (_shr(x, 32, 64) ^ (x & 0xFFFFFFFF)).to(torch.int32)  # < 2**32: wraps into int32
    token = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * 0x9E3779B9 & 0xFFFFFFFF).to(torch.int32)
    h = row.unsqueeze(1) ^ token  # (rows, vocab); int32 products below wrap, as the hash wants
    h ^= _shr(h, 16, 32)
    h *= _int(0x7FEB352D, 32)
    h ^= _shr(h, 15, 32)
    h *= _int(0x846CA68B, 32)
    h ^= _shr(h, 16, 32)
    return _shr(h, 9, 32).float().add_(0.5).mul_(2.0**-23)


class TransformersSampler:
    """Sample from a local Hugging Face causal LM, ``batch_size`` sequences at a time.

    Prompts are formatted and tokenised by ``alignment.prompting`` (chat template, special tokens
    once); generation stops at every end id the model declares and at ``prompt.stop`` strings.
    """

    def __init__(
        self,
        model_path: str,
        *,
        batch_size: int = 256,
        device: str | None = None,
        dtype: str = "float32",
        prompt: PromptFormat | dict | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
    ):
        self.model, self.tokenizer = load_policy(model_path, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        self.formatter = formatter_for(self.model, self.tokenizer, prompt)
        self.batch_size = batch_size
        self.progress = progress

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], n: int, params: SamplingParams, prompt_ids: Sequence[int] | None = None
    ) -> Generation:
        ids = request_ids(prompts, n, prompt_ids)
        fmt = self.formatter
        encoded = fmt.check_prompts(prompts, params.max_new_tokens)
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        # Sort by prompt length so a batch holds similar lengths: less padding, same results.
        rows.sort(key=lambda r: len(encoded[r[0]]))
        out: dict[tuple[int, int], tuple[str, str, int]] = {}
        config = GenerationConfig(
            do_sample=False, max_new_tokens=params.max_new_tokens, pad_token_id=fmt.pad_id, eos_token_id=list(fmt.end_ids),
        )
        batches = range(0, len(rows), self.batch_size)
        for start in tqdm(batches, desc="sampling", unit="batch", disable=None if self.progress else True, leave=False):
            batch = rows[start : start + self.batch_size]
            input_ids, mask = _left_pad([encoded[i] for i, _ in batch], fmt.pad_id, self.model.device)
            processors = LogitsProcessorList()
            if params.temperature > 0:
                processors.append(TemperatureLogitsWarper(params.temperature))
                if params.top_p < 1.0:
                    processors.append(TopPLogitsWarper(params.top_p))
                seeds = [row_seed(params.seed, ids[i], j) for i, j in batch]
                processors.append(_GumbelNoise(seeds, input_ids.shape[1], self.model.device))
            generated = self.model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=config, logits_processor=processors
            )
            new = generated[:, input_ids.shape[1] :]
            for row, seq in zip(batch, new.tolist(), strict=True):
                out[row] = fmt.finish(seq)
        return Generation(
            completions=[[out[(i, j)][0] for j in range(n)] for i in range(len(prompts))],
            finish_reasons=[[out[(i, j)][1] for j in range(n)] for i in range(len(prompts))],
            num_tokens=[[out[(i, j)][2] for j in range(n)] for i in range(len(prompts))],
        )


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)
