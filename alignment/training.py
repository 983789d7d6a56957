"""Supervised fine-tuning with prompt tokens masked: the loss L(x, y; theta) of ReST's Improve step.

ReST (seed notes 004, Algorithm 1) optimises ``J(theta) = E_{(x,y) ~ D_g}[F(x, y; tau) L(x, y; theta)]``;
with ``F`` the filter, this is plain negative log-likelihood of the kept completions given their
prompts: ``L = -sum_t log pi_theta(y_t | x, y_<t)``, averaged over completion tokens. The same loop is
the behaviour-cloning warm start ("Train pi_theta on D").
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignment.lora import add_lora, save_merged
from alignment.models import load_policy

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # "bfloat16" trains under bf16 autocast on CUDA
    seed: int = 0
    lora_r: int = 0  # LoRA rank; 0 trains all weights


def encode_pairs(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example: prompt labels are masked, the completion ends with EOS."""
    eos = tokenizer.eos_token_id
    out = []
    for p, c in zip(prompts, completions, strict=True):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [eos]
        out.append((p_ids + c_ids, [IGNORE] * len(p_ids) + c_ids))
    return out


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of ``(input_ids, labels)``."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def autocast(device: torch.device, dtype: str):
    enabled = device.type == "cuda" and dtype == "bfloat16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def sft(
    model_path: str | Path,
    out_dir: str | Path,
    prompts: Sequence[str],
    completions: Sequence[str],
    cfg: TrainConfig,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Fine-tune the model at ``model_path`` on (prompt, completion) pairs and save it to ``out_dir``."""
    if not prompts:
        raise ValueError("Nothing to train on: the filtered dataset is empty.")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(model_path, trust_remote_code=trust_remote_code)
    if cfg.lora_r:
        model = add_lora(model, cfg.lora_r)
    model.train()
    examples = encode_pairs(tokenizer, prompts, completions)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    rng = random.Random(cfg.seed)
    losses: list[float] = []
    bar = tqdm(total=total, desc="training", unit="step", disable=not progress, leave=False)
    step = 0
    for _ in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            batch = collate([examples[i] for i in order[start : start + cfg.batch_size]], tokenizer.pad_token_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with autocast(model.device, cfg.dtype):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if on_step is not None:
                on_step(step, losses[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    save_merged(model, tokenizer, out_dir)
    tail = losses[-steps_per_epoch:]
    return {"train_loss": sum(tail) / len(tail), "train_steps": float(step), "train_examples": float(len(examples))}
