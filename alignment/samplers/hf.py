"""The ``transformers`` sampler: batched generation with per-sample seeds.

Sampling is Gumbel-max: ``argmax(logits / T + g)`` with ``g ~ Gumbel(0, 1)`` draws a token from
``softmax(logits / T)`` (restricted to the top-p nucleus when ``top_p < 1``). Each sample's noise
comes from its own generator seeded by ``(seed, prompt_id, sample_idx)``, so a sample is the same
whatever the batch size, prompt order or shard it lands in — the property that lets a resumed or
sharded Grow reproduce an uninterrupted one row for row.
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
    """Adds per-row Gumbel noise from per-row generators; greedy decoding then samples exactly."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
        return scores + gumbel.to(scores.dtype)


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
        for start in tqdm(batches, desc="sampling", unit="batch", disable=not self.progress, leave=False):
            batch = rows[start : start + self.batch_size]
            input_ids, mask = _left_pad([encoded[i] for i, _ in batch], fmt.pad_id, self.model.device)
            processors = LogitsProcessorList()
            if params.temperature > 0:
                processors.append(TemperatureLogitsWarper(params.temperature))
                if params.top_p < 1.0:
                    processors.append(TopPLogitsWarper(params.top_p))
                seeds = [row_seed(params.seed, ids[i], j) for i, j in batch]
                processors.append(_GumbelNoise(seeds, self.model.device))
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
