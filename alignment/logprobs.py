"""Sequence log-probabilities of completions given their prompts: the inputs of every preference loss.

``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over the completion tokens plus the closing end id, with the
prompt tokens masked: the same tokens ``alignment.training.encode_pairs`` trains on in SFT.

``batch_logps`` is differentiable and works on a collated batch (the trainer's forward pass);
``sequence_logps`` is the no-grad, batched version used to precompute reference log-probs once per
iteration, so that they can be stored with the pairs and training holds a single model.
``batch_token_logps`` and ``token_logps`` are the same per completion token, for losses that weigh
each token (GRPO): the no-grad version's lists are stored beside each sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.progress import Ticker
from alignment.prompting import PromptFormat, formatter_for
from alignment.training import IGNORE, autocast, collate, encode_pairs


def batch_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed completion log-prob (float32, differentiable) and completion length of each row.

    ``batch`` is the output of ``alignment.training.collate``: right-padded ``input_ids``,
    ``attention_mask``, and ``labels`` equal to ``IGNORE`` on prompt and padding positions.

    Padding is not computed: rows run in groups of similar length (``_length_groups``), each cut to
    its longest row, and the logits come only from the first position that predicts a label onwards
    (``logits_to_keep``, where the model takes it). Right padding never reaches a real token through
    causal attention, so each row's log-prob is the one a single padded pass gives.
    """
    mask, labels = batch["attention_mask"], batch["labels"]
    width = mask.shape[1]
    lengths = mask.sum(dim=1)
    right_padded = bool((mask == (torch.arange(width, device=mask.device) < lengths.unsqueeze(1))).all())
    groups = _length_groups(lengths.tolist()) if right_padded else [list(range(mask.shape[0]))]
    if len(groups) == 1:
        cut = max(1, *lengths.tolist()) if right_padded else width
        return _logps(model, batch["input_ids"][:, :cut], mask[:, :cut], labels[:, :cut])
    parts = []
    for rows in groups:
        index = torch.tensor(rows, device=mask.device)
        cut = int(lengths[index].max())
        parts.append(_logps(model, batch["input_ids"][index, :cut], mask[index, :cut], labels[index, :cut]))
    order = torch.tensor([r for rows in groups for r in rows], device=mask.device)
    logps = torch.cat([p for p, _ in parts]).index_select(0, torch.argsort(order))
    return logps, (labels[:, 1:] != IGNORE).sum(dim=1)


def _logps(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    token_nll, shifted, _ = _token_nll(model, input_ids, attention_mask, labels)
    return -token_nll.sum(dim=1), (shifted != IGNORE).sum(dim=1)


def _token_nll(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position NLL of the next token (0 where no label), the labels it was taken against, and the logits,
    all cut to the positions from the first that predicts a label onwards."""
    # Position t predicts token t+1: shift the labels, not the logits, so the logits are never copied.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    if _takes_logits_to_keep(model):
        predicting = (shifted != IGNORE).any(dim=0).nonzero()
        keep = shifted.shape[1] - int(predicting[0]) if len(predicting) else 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    shifted = shifted[:, shifted.shape[1] - logits.shape[1] :]  # the positions whose logits were kept
    # cross_entropy is a fused log-softmax + gather; it is 0 at ignored positions.
    token_nll = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE, reduction="none")
    return token_nll.view_as(shifted), shifted, logits


def batch_token_logps(model, batch: dict[str, Tensor], *, entropy: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token completion log-probs ``[B, W]`` (float32, differentiable; 0 off the completion), the
    completion mask ``[B, W]`` (bool), and with ``entropy`` the policy's entropy at each position (no grad).

    ``batch`` is a collated batch as for ``batch_logps``; ``W`` covers the positions from the first that
    predicts a completion token, so row i's completion tokens are ``logps[i][mask[i]]``, in order.
    """
    token_nll, shifted, logits = _token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    mask = shifted != IGNORE
    ent = None
    if entropy:
        with torch.no_grad():  # one row at a time: a row's [W, vocab] softmax, not the batch's
            ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in (row.float().log_softmax(-1) for row in logits)])
    return -token_nll, mask, ent


def _length_groups(lengths: list[int], waste: float = 0.1) -> list[list[int]]:
    """Row indices in groups of similar length: each group, padded to its longest row, adds at most
    ``waste`` of its real tokens as padding. One group when that costs no more than ``waste`` overall."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    if len(lengths) * max(lengths, default=0) <= (1 + waste) * sum(lengths):
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    total = 0
    for r in order:
        if groups and (len(groups[-1]) + 1) * lengths[r] <= (1 + waste) * (total + lengths[r]):
            groups[-1].append(r)
            total += lengths[r]
        else:
            groups.append([r])
            total = lengths[r]
    return groups


def _takes_logits_to_keep(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (a PEFT wrapper passes it through to its base model)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


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
    tick = Ticker(len(examples), "completions scored")  # a long no-grad pass says how far it is, as training does
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], fmt.pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with autocast(model.device, dtype):
                logp, length = batch_logps(model, batch)
            logps.append(logp.cpu())
            lengths.append(length.cpu())
            tick(start + len(logp))
    finally:
        model.train(was_training)
    if not logps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logps), torch.cat(lengths)


@torch.no_grad()
def token_logps(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    finished: Sequence[bool] | None = None,
    batch_size: int = 32,
    *,
    dtype: str = "float32",
    prompt: PromptFormat | None = None,
) -> list[list[float]]:
    """Each completion's per-token log-probs under ``model`` (no grad), one list per (prompt, completion):
    the tokens ``encode_pairs`` trains on, the end id included unless ``finished[i]`` is False."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    fmt = formatter_for(model, tokenizer, prompt)
    examples = encode_pairs(tokenizer, prompts, completions, fmt, finished)
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    tick = Ticker(len(examples), "completions scored")
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], fmt.pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with autocast(model.device, dtype):
                logps, mask, _ = batch_token_logps(model, batch)
            out += [row[keep].tolist() for row, keep in zip(logps.cpu(), mask.cpu(), strict=True)]
            tick(len(out))
    finally:
        model.train(was_training)
    return out
