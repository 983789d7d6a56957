"""Sequence log-probabilities of completions given their prompts: the inputs of every preference loss.

``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over the completion tokens plus the closing end id, with the
prompt tokens masked: the same tokens ``alignment.training.encode_pairs`` trains on in SFT.

``batch_logps`` is differentiable and works on a collated batch (the trainer's forward pass);
``sequence_logps`` is the no-grad, batched version used to precompute reference log-probs once per
iteration, so that they can be stored with the pairs and training holds a single model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.prompting import PromptFormat, formatter_for
from alignment.training import IGNORE, autocast, collate, encode_pairs


def batch_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed completion log-prob (float32, differentiable) and completion length of each row.

    ``batch`` is the output of ``alignment.training.collate``: right-padded ``input_ids``,
    ``attention_mask``, and ``labels`` equal to ``IGNORE`` on prompt and padding positions.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Position t predicts token t+1: shift the labels, not the logits, so the logits are never copied.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    # cross_entropy is a fused log-softmax + gather; it is 0 at ignored positions.
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return -token_nll.view_as(labels).sum(dim=1), (labels != IGNORE).sum(dim=1)


@torch.no_grad()
def sequence_logps(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 32,
    *,
    dtype: str = "float32",
    prompt: PromptFormat | None = None,
) -> tuple[Tensor, Tensor]:
    """``(logps, lengths)`` on the CPU, one per (prompt, completion): ``log π(completion + EOS | prompt)``.

    Runs in eval mode (no dropout) and restores the model's mode afterwards. ``dtype="bfloat16"``
    runs under bf16 autocast on CUDA, like the trainer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    fmt = formatter_for(model, tokenizer, prompt)
    examples = encode_pairs(tokenizer, prompts, completions, fmt)
    was_training = model.training
    model.eval()
    logps, lengths = [], []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], fmt.pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with autocast(model.device, dtype):
                logp, length = batch_logps(model, batch)
            logps.append(logp.cpu())
            lengths.append(length.cpu())
    finally:
        model.train(was_training)
    if not logps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logps), torch.cat(lengths)
