"""Supervised fine-tuning with prompt tokens masked: the loss L(x, y; theta) of ReST's Improve step.

ReST (arXiv 2308.08998, Algorithm 1) optimises ``J(theta) = E_{(x,y) ~ D_g}[F(x, y; tau) L(x, y; theta)]``;
with ``F`` the filter, this is plain negative log-likelihood of the kept completions given their
prompts: ``L = -sum_t log pi_theta(y_t | x, y_<t)``, averaged over completion tokens. The same loop is
the behaviour-cloning warm start ("Train pi_theta on D").

``train_loop`` is the one training loop of flywheel: SFT, the preference losses and RLOO
(``alignment.preference``) and reward models (``alignment.reward_model``) differ only in the
objective they hand it. Tokens come from ``alignment.prompting``, so a model is trained on exactly
the text it is sampled with.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignment import distributed
from alignment.lora import add_lora, save_merged
from alignment.models import load_policy
from alignment.progress import Ticker
from alignment.prompting import IGNORE, Formatter, PromptFormat, formatter_for
from alignment.train_settings import TrainConfig


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    fmt: PromptFormat | Formatter | None = None,
    finished: Sequence[bool] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example, from ``alignment.prompting``: prompt masked, completion + end id.

    ``finished[i] = False`` trains a truncated completion without an end token.
    """
    f = fmt if isinstance(fmt, Formatter) else Formatter(tokenizer, fmt)
    done = finished if finished is not None else [True] * len(prompts)
    return [f.example(p, c, d) for p, c, d in zip(prompts, completions, done, strict=True)]


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
    """Mixed precision over float32 weights: bfloat16 on CPU or GPU, float16 on GPU; float32 is off."""
    low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    enabled = low is not None and (device.type == "cuda" or low is torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=low or torch.bfloat16, enabled=enabled)


def with_lora(model, cfg: TrainConfig):
    """``model`` with ``cfg``'s LoRA adapters on it when ``cfg.lora_r > 0``, else ``model`` itself."""
    if not cfg.lora_r:
        return model
    return add_lora(model, cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_target_modules)


def save_trained(model, tokenizer, out_dir: str | Path, cfg: TrainConfig, *, rebuild: Callable[[], torch.nn.Module]) -> None:
    """Save the trained model as one plain Hugging Face folder (LoRA merged), from rank 0 only.

    Under FSDP every rank takes part in gathering the full state dict; rank 0 then loads it into a fresh,
    unsharded copy of the model (``rebuild()``: the starting model with the same adapters) and saves that,
    so the folder is exactly what a one-process run writes.
    """
    w = distributed.world(cfg.strategy)
    state = distributed.full_state_dict(model, w) if w.sharded else None
    if w.main:
        if state is not None:
            model = rebuild()
            model.load_state_dict(state)
        save_merged(model, tokenizer, out_dir)
    w.barrier()


def train_loop(
    model,
    units: Sequence[list[int]],
    step_loss: Callable[[list[int]], torch.Tensor],
    cfg: TrainConfig,
    *,
    lengths: Sequence[int] | None = None,
    desc: str = "training",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    on_update: Callable[[dict[str, float]], None] | None = None,
) -> list[float]:
    """The one training loop: AdamW over seeded shuffles of ``units`` (lists of row indices).

    ``step_loss(rows)`` is the objective — SFT's NLL, a preference loss, a Bradley–Terry loss, GRPO —
    and returns the mean loss of those rows, or ``(loss, figures)`` with figures of those rows (floats)
    to be averaged like the loss. ``cfg.batch_size`` units make an optimiser step, split into
    micro-batches of ``cfg.micro_batch_size`` units whose gradients accumulate (each weighted by its
    share of the step). With ``cfg.group_by_length`` (and ``lengths`` per unit) each step holds units
    of similar length. Returns the loss of every optimiser step. ``on_step(step, loss)`` is called on
    rank 0 after each step; ``on_update`` on every rank with the step's ``loss``, ``grad_norm`` (before
    clipping) and the step's mean of each figure.

    Under a launch with ``cfg.strategy`` ``ddp`` or ``fsdp`` (``alignment.distributed``), every rank
    runs this same loop: the order is the same in all, each step's units are split across the ranks
    so the global batch is still ``batch_size``, each micro-batch is weighted by its share of the
    whole step, and the returned losses are the global ones.
    """
    w = distributed.world(cfg.strategy)
    model = distributed.prepare(model, w, cfg.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    micro = max(1, min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size))
    rng = random.Random(cfg.seed)
    total = math.ceil(len(units) / cfg.batch_size) * cfg.epochs
    shown = progress and w.main
    bar = tqdm(total=total, desc=desc, unit="step", disable=None if shown else True, leave=False)  # bars only on a terminal
    precision = contextlib.nullcontext if distributed.uses_fsdp_precision(model, cfg.dtype) else (lambda: autocast(model.device, cfg.dtype))
    losses: list[float] = []
    tick = Ticker(total, "steps")  # progress where no bar is drawn, inside an alignment.progress.reporting block
    model.train()
    for _ in range(cfg.epochs):
        order = list(range(len(units)))
        rng.shuffle(order)
        steps = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        if cfg.group_by_length and lengths is not None:
            ranked = sorted(order, key=lambda u: lengths[u])
            steps = [ranked[s : s + cfg.batch_size] for s in range(0, len(ranked), cfg.batch_size)]
            rng.shuffle(steps)
        for step_units in steps:
            step_total, step_figures = 0.0, {}
            mine = w.share(step_units)
            chunks = [mine[m : m + micro] for m in range(0, len(mine), micro)]
            passes = w.passes(len(step_units), micro)
            for k in range(passes):
                # Past its own chunks a rank still joins FSDP's collectives: one pass with weight 0.
                chunk = chunks[k] if k < len(chunks) else []
                w.set_sync(model, k == passes - 1)
                with precision():
                    out = step_loss([row for u in (chunk or step_units[:1]) for row in units[u]])
                loss, figures = out if isinstance(out, tuple) else (out, {})
                share = len(chunk) / len(step_units)
                (loss * (share * w.size)).backward()  # the ranks' gradients are averaged: size * share sums them
                step_total += loss.item() * share
                for name, value in figures.items():
                    step_figures[name] = step_figures.get(name, 0.0) + value * share
            w.average_gradients(params)
            step_total = w.total(step_total)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_total)
            if on_step is not None and w.main:
                on_step(len(losses), losses[-1])
            if w.main:
                tick(len(losses), f"loss {losses[-1]:.4g}")
            if on_update is not None:
                on_update({"loss": step_total, "grad_norm": _full(norm), **_summed(step_figures, w)})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses


def _full(norm: torch.Tensor) -> float:
    """A gradient norm as a float (under FSDP, the norm over every rank's shards)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _summed(figures: dict[str, float], w: distributed.World) -> dict[str, float]:
    """Each figure summed over the ranks (each holds its share-weighted part; a rank without units, none)."""
    if w.size == 1:
        return figures
    import torch.distributed as dist

    gathered: list[dict[str, float]] = [{} for _ in range(w.size)]
    dist.all_gather_object(gathered, figures)
    return {name: sum(g.get(name, 0.0) for g in gathered) for name in dict.fromkeys(n for g in gathered for n in g)}


def sft(
    model_path: str | Path,
    out_dir: str | Path,
    prompts: Sequence[str],
    completions: Sequence[str],
    cfg: TrainConfig,
    *,
    finished: Sequence[bool] | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Fine-tune the model at ``model_path`` on (prompt, completion) pairs and save it to ``out_dir``."""
    if not prompts:
        raise ValueError("Nothing to train on: the filtered dataset is empty.")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(model_path, trust_remote_code=trust_remote_code)
    model = with_lora(model, cfg)
    fmt = formatter_for(model, tokenizer, cfg.prompt)
    examples = encode_pairs(tokenizer, prompts, completions, fmt, finished)

    def step_loss(rows: list[int]) -> torch.Tensor:
        batch = collate([examples[i] for i in rows], fmt.pad_id)
        return model(**{k: v.to(model.device) for k, v in batch.items()}).loss

    units = [[i] for i in range(len(examples))]
    losses = train_loop(model, units, step_loss, cfg, lengths=[len(e[0]) for e in examples], progress=progress, on_step=on_step)
    save_trained(model, tokenizer, out_dir, cfg, rebuild=lambda: with_lora(load_policy(model_path, trust_remote_code=trust_remote_code, device="cpu")[0], cfg))
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    tail = losses[-steps_per_epoch:]
    return {"train_loss": sum(tail) / len(tail), "train_steps": float(len(losses)), "train_examples": float(len(examples))}
