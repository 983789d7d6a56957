"""Preference fine-tuning: the DPO family on (prompt, chosen, rejected) pairs, and RLOO on sample groups.

One iteration of iterative DPO trains the policy on pairs drawn from its own samples. The reference
log-probs ``ref_chosen_logp, ref_rejected_logp`` are computed once per iteration with
``add_reference_logps`` and stored with the pairs, so training holds one model; when the pairs come
without them, ``train_preference`` computes them from the starting model (the iteration's reference)
before the first update. Every loss declared in ``alignment.loss_table.LOSSES`` is available by name.

Departures, on purpose: dropout is off while training (as TRL's ``disable_dropout``), so the policy and
reference log-probs of an unchanged model agree exactly; ``rloo`` trains on groups of N samples per
prompt, not pairs, through ``train_rloo``, and performs one REINFORCE step per batch (no PPO-style
ratios or clipping, as in the RLOO paper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl
import torch

from alignment import distributed
from alignment.logprobs import batch_logps, sequence_logps
from alignment.losses import GroupInputs, LossInputs, with_nll
from alignment.models import load_policy
from alignment.prompting import PromptFormat, formatter_for
from alignment.train_settings import PreferenceConfig
from alignment.training import collate, encode_pairs, save_trained, train_loop, with_lora

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
REWARD_COLUMNS = ("chosen_reward", "rejected_reward")
GROUP_COLUMNS = ("prompt_id", "prompt", "completion", "reward")


def pair_logps(
    model, tokenizer, pairs: pl.DataFrame, batch_size: int = 64, *, dtype: str = "float32", prompt: PromptFormat | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (no grad, float32, CPU) of each pair's chosen and rejected completion under ``model``."""
    prompts = pairs["prompt"].to_list()
    kw = {"dtype": dtype, "prompt": prompt}
    chosen, _ = sequence_logps(model, tokenizer, prompts, pairs["chosen"].to_list(), batch_size, **kw)
    rejected, _ = sequence_logps(model, tokenizer, prompts, pairs["rejected"].to_list(), batch_size, **kw)
    return chosen, rejected


def add_reference_logps(
    model, tokenizer, pairs: pl.DataFrame, batch_size: int = 64, *, dtype: str = "float32", prompt: PromptFormat | None = None
) -> pl.DataFrame:
    """``pairs`` with ``ref_chosen_logp`` and ``ref_rejected_logp`` computed by ``model`` (the reference)."""
    _require_columns(pairs, PAIR_COLUMNS, "pairs")
    chosen, rejected = pair_logps(model, tokenizer, pairs, batch_size, dtype=dtype, prompt=prompt)
    return pairs.with_columns(
        pl.Series(REF_COLUMNS[0], chosen.tolist(), dtype=pl.Float64),
        pl.Series(REF_COLUMNS[1], rejected.tolist(), dtype=pl.Float64),
    )


def reference_logps_for(
    pairs: pl.DataFrame, cfg: PreferenceConfig, reference: Callable[[], str | Path], *, trust_remote_code: bool = False
) -> pl.DataFrame:
    """``pairs`` with the reference policy's log-probs when ``cfg``'s loss reads them; as given otherwise.

    ``reference`` returns the reference model's directory; it is called only when the log-probs are
    needed, so a reference-free loss never fetches or loads a second model.
    """
    if not pairs.height or not cfg.spec.needs_reference:
        return pairs
    model, tokenizer = load_policy(reference(), trust_remote_code=trust_remote_code)

    def block(rows: slice) -> list[tuple[float, float]]:  # under a launch, each rank scores its block of pairs
        chosen, rejected = pair_logps(model, tokenizer, pairs[rows], cfg.ref_batch_size, dtype=cfg.dtype, prompt=cfg.prompt)
        return list(zip(chosen.tolist(), rejected.tolist(), strict=True))

    both = distributed.map_rows(block, pairs.height, cfg.strategy)
    return pairs.with_columns(
        pl.Series(REF_COLUMNS[0], [c for c, _ in both], dtype=pl.Float64),
        pl.Series(REF_COLUMNS[1], [r for _, r in both], dtype=pl.Float64),
    )


def fit(
    model_path: str | Path,
    out_dir: str | Path,
    data: pl.DataFrame,
    cfg: PreferenceConfig,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train with ``cfg``'s loss on ``data``: pairs for a pairwise loss (``train_preference``), the scored
    samples for a group loss (``train_rloo``). ``cfg.spec.trains_on`` names which."""
    train = train_rloo if cfg.spec.kind == "group" else train_preference
    return train(model_path, out_dir, data, cfg, trust_remote_code=trust_remote_code, progress=progress, on_step=on_step)


def train_preference(
    model_path: str | Path,
    out_dir: str | Path,
    pairs: pl.DataFrame,
    cfg: PreferenceConfig,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train the model at ``model_path`` on ``pairs`` with ``cfg``'s pairwise loss; save it to ``out_dir``.

    ``pairs`` needs ``prompt, chosen, rejected``; ``ref_chosen_logp, ref_rejected_logp`` are used when
    present (else computed from the starting model); ``chosen_reward, rejected_reward`` when the loss
    needs rewards. Returns the last epoch's mean loss and, from a no-grad pass after training, the
    reward accuracy (share of pairs with Δ_w > Δ_l, Δ = log π − log π_ref), the mean margin Δ_w − Δ_l
    and the mean change of the chosen and rejected log-probs from the reference.
    """
    spec = cfg.spec
    if spec.kind != "pairwise":
        raise ValueError(f"loss {spec.name!r} trains on groups of samples, not pairs: call train_rloo instead.")
    _require_columns(pairs, PAIR_COLUMNS + (REWARD_COLUMNS if spec.needs_rewards else ()), "pairs")
    model, tokenizer = load_trainable(model_path, cfg, trust_remote_code)
    if not set(REF_COLUMNS) <= set(pairs.columns):
        pairs = add_reference_logps(model, tokenizer, pairs, cfg.ref_batch_size, dtype=cfg.dtype, prompt=cfg.prompt)
    prompts = pairs["prompt"].to_list()
    fmt = formatter_for(model, tokenizer, cfg.prompt)
    chosen = encode_pairs(tokenizer, prompts, pairs["chosen"].to_list(), fmt)
    rejected = encode_pairs(tokenizer, prompts, pairs["rejected"].to_list(), fmt)
    ref_chosen, ref_rejected = (_column(pairs, name) for name in REF_COLUMNS)
    # Per-pair tensors of LossInputs that come from the frame rather than the forward pass.
    stored = {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    if spec.needs_rewards:
        stored |= dict(zip(("chosen_rewards", "rejected_rewards"), (_column(pairs, c) for c in REWARD_COLUMNS)))

    loss = _objective(cfg)

    def step_loss(idx: list[int]) -> torch.Tensor:
        # One batch: the chosen rows followed by the rejected rows (batch_logps skips their padding).
        batch = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], fmt.pad_id)
        logps, lengths = batch_logps(model, {k: v.to(model.device) for k, v in batch.items()})
        (chosen_logps, rejected_logps), (chosen_len, rejected_len) = logps.chunk(2), lengths.chunk(2)
        inputs = LossInputs(
            chosen_logps, rejected_logps, chosen_lengths=chosen_len, rejected_lengths=rejected_len,
            **{name: values[idx].to(model.device) for name, values in stored.items()},
        )  # fmt: skip
        return loss(inputs).mean()

    lengths = [len(chosen[i][0]) + len(rejected[i][0]) for i in range(len(pairs))]
    losses = train_loop(model, [[i] for i in range(len(pairs))], step_loss, cfg, lengths=lengths,
                        desc=f"training ({spec.name})", progress=progress, on_step=on_step)
    after_chosen, after_rejected = pair_logps(model, tokenizer, pairs, cfg.ref_batch_size, dtype=cfg.dtype, prompt=cfg.prompt)
    save_trained(model, tokenizer, out_dir, cfg, rebuild=lambda: rebuild_trainable(model_path, cfg, trust_remote_code))
    chosen_change, rejected_change = after_chosen - ref_chosen, after_rejected - ref_rejected
    return {
        "train_loss": _last_epoch_mean(losses, cfg.epochs),
        "reward_accuracy": (chosen_change > rejected_change).float().mean().item(),
        "margin": (chosen_change - rejected_change).mean().item(),
        "chosen_logp_change": chosen_change.mean().item(),
        "rejected_logp_change": rejected_change.mean().item(),
        "train_steps": float(len(losses)),
        "train_pairs": float(len(pairs)),
    }


def train_rloo(
    model_path: str | Path,
    out_dir: str | Path,
    samples: pl.DataFrame,
    cfg: PreferenceConfig,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train with RLOO on ``samples`` (columns ``prompt_id, prompt, completion, reward``; N ≥ 2 per prompt).

    Each step takes ``cfg.batch_size`` whole prompt groups, so every leave-one-out baseline sees its
    full group. Returns the last epoch's mean loss and the mean log-prob change of the samples that
    beat their baseline (should rise) and of those below it (should fall).
    """
    if cfg.spec.kind != "group":
        raise ValueError(f"train_rloo trains a group loss such as 'rloo'; {cfg.spec.name!r} trains on pairs: call train_preference.")
    _require_columns(samples, GROUP_COLUMNS, "samples")
    if samples.group_by("prompt_id").len()["len"].min() < 2:
        raise ValueError("rloo needs at least 2 samples per prompt_id for its leave-one-out baseline.")
    model, tokenizer = load_trainable(model_path, cfg, trust_remote_code)
    prompts, completions = samples["prompt"].to_list(), samples["completion"].to_list()
    before, _ = sequence_logps(model, tokenizer, prompts, completions, cfg.ref_batch_size, dtype=cfg.dtype, prompt=cfg.prompt)
    fmt = formatter_for(model, tokenizer, cfg.prompt)
    examples = encode_pairs(tokenizer, prompts, completions, fmt)
    rewards = _column(samples, "reward")
    group_ids = torch.tensor(samples["prompt_id"].rank("dense").to_list(), dtype=torch.long)
    groups = samples.with_row_index("_row").group_by("prompt_id", maintain_order=True).agg("_row")["_row"].to_list()
    loss = _objective(cfg)

    def step_loss(idx: list[int]) -> torch.Tensor:
        batch = collate([examples[i] for i in idx], fmt.pad_id)
        logps, _ = batch_logps(model, {k: v.to(model.device) for k, v in batch.items()})
        inputs = GroupInputs(logps, rewards[idx].to(model.device), group_ids[idx].to(model.device))
        return loss(inputs).mean()

    losses = train_loop(model, groups, step_loss, cfg, desc=f"training ({cfg.spec.name})", progress=progress, on_step=on_step)
    after, _ = sequence_logps(model, tokenizer, prompts, completions, cfg.ref_batch_size, dtype=cfg.dtype, prompt=cfg.prompt)
    save_trained(model, tokenizer, out_dir, cfg, rebuild=lambda: rebuild_trainable(model_path, cfg, trust_remote_code))
    # The sign of the RLOO advantage is the sign of r_i minus its group's mean reward.
    group_mean = torch.tensor(samples.select(pl.col("reward").mean().over("prompt_id")).to_series().to_list())
    advantage = rewards - group_mean
    change = after - before
    return {
        "train_loss": _last_epoch_mean(losses, cfg.epochs),
        "logp_change_above_baseline": _masked_mean(change, advantage > 0),
        "logp_change_below_baseline": _masked_mean(change, advantage < 0),
        "train_steps": float(len(losses)),
        "train_samples": float(len(samples)),
        "train_prompts": float(len(groups)),
    }


# --- Plumbing shared by both trainers --------------------------------------------------------


def _objective(cfg: PreferenceConfig) -> Callable[[LossInputs | GroupInputs], torch.Tensor]:
    """Per-example losses of one batch under ``cfg``'s loss, with its NLL term. The loss and its
    hyperparameters were checked against the loss table when ``cfg.objective`` was built, not per batch."""
    fn, hparams, nll_alpha = cfg.spec.fn, cfg.objective.loss_hparams(), cfg.objective.nll_weight
    return lambda batch: with_nll(fn(batch, **hparams), batch, nll_alpha)


def rebuild_trainable(model_path: str | Path, cfg: PreferenceConfig, trust_remote_code: bool):
    """A fresh CPU copy of the starting model with ``cfg``'s adapters: what rank 0 loads FSDP's gathered weights into."""
    return with_lora(load_policy(model_path, trust_remote_code=trust_remote_code, device="cpu")[0], cfg)


def load_trainable(model_path: str | Path, cfg: PreferenceConfig, trust_remote_code: bool):
    """Load the policy with dropout off and, when ``cfg.lora_r > 0``, LoRA adapters on it."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(model_path, trust_remote_code=trust_remote_code)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return with_lora(model, cfg), tokenizer


def _require_columns(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"The {what} frame lacks column(s) {', '.join(missing)}; it has {', '.join(frame.columns)}.")
    if frame.height == 0:
        raise ValueError(f"Nothing to train on: the {what} frame is empty.")


def _column(frame: pl.DataFrame, name: str) -> torch.Tensor:
    """A numeric column as a float32 tensor; nulls are an error that names the column."""
    nulls = frame[name].null_count()
    if nulls:
        raise ValueError(f"Column {name} has {nulls} null value(s); fill them or drop those rows before training.")
    return torch.tensor(frame[name].cast(pl.Float64).to_list(), dtype=torch.float32)


def _last_epoch_mean(losses: list[float], epochs: int) -> float:
    tail = losses[-max(1, len(losses) // epochs) :]
    return sum(tail) / len(tail)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return values[mask].mean().item() if bool(mask.any()) else float("nan")
