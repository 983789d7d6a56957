"""GRPO's pieces: a step's batch of prompts, its groups, their advantages and stored log-probs, and the μ epochs
of updates (DeepSeekMath, Shao et al., arXiv 2402.03300, Algorithm 1; the loss is ``alignment.losses.grpo``).

One step of Algorithm 1, as the flow runs it (flows/grpo.py):

1. ``prompt_batch``: the step's D_b, drawn from the prompts without replacement, seeded per (iteration, step);
2. Grow samples G completions per prompt from π_old, the policy of that moment; Score rewards them;
3. ``informative``: DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, §3.2) drops the groups whose
   rewards are all equal — their advantages are 0, they only dilute the batch; ``with_advantages`` gives
   each sample ``Â_i = (r_i − mean(r_g)) / std(r_g)`` (``group_advantages``);
4. ``token_logps`` (alignment.logprobs), once, without gradients: each sample's per-token log-probs under
   π_old and, when ``beta > 0``, π_ref, stored in the step's ``groups`` table beside the sample;
5. ``train_grpo``: μ = ``epochs`` passes over the step's groups through ``alignment.training.train_loop``,
   ``batch_size`` groups per update, each update the clipped objective of Eq. 3 against the stored π_old and
   π_ref. Returns the step's figures and one row of figures per update (the ``updates`` table).

Where this departs from the paper: π_old is the stored pass of step 4, not the policy kept in memory (the same
numbers up to the rounding of a different batch, and a resumed step trains on exactly them); the μ epochs reuse
the step's samples, as the paper's inner loop does; a micro-batch's share of an update is its share of the
update's groups, so with ``loss_agg: sequence`` and groups of unequal size (truncated samples dropped) the
weights differ slightly from one pass over the whole update.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl
import torch

from alignment.logprobs import batch_token_logps
from alignment.losses import TokenInputs, group_advantages, grpo_stats
from alignment.metrics import describe, own
from alignment.prompting import IGNORE, formatter_for
from alignment.train_settings import GRPOSettings, PreferenceConfig
from alignment.training import collate, encode_pairs, save_trained, train_loop

GROUP_COLUMNS = ("prompt_id", "prompt", "completion", "advantage", "old_logps", "ref_logps")
# What each update records, named as TRL's GRPOTrainer and verl log them (clip ratios without TRL's "/…_mean").
UPDATE_FIGURES = ("loss", "pg_loss", "kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "grad_norm")
_STAT_NAMES = {"pg_loss": "pg_loss", "kl": "kl", "clip_ratio/low_mean": "clip_ratio_low",
               "clip_ratio/high_mean": "clip_ratio_high", "clip_ratio/region_mean": "clip_ratio_region"}  # fmt: skip


def prompt_batch(prompt_ids: Sequence[int], size: int, seed: int) -> list[int]:
    """The step's batch D_b: ``size`` of ``prompt_ids`` drawn without replacement (all of them when there are
    fewer), sorted; the same for the same ids, size and seed."""
    ids = sorted(prompt_ids)
    return ids if size >= len(ids) else sorted(random.Random(seed).sample(ids, size))


def informative(samples: pl.DataFrame) -> pl.DataFrame:
    """The samples of the prompts whose rewards differ (DAPO's dynamic sampling): a group whose rewards are all
    equal, a group of one included, has no advantage to learn from."""
    spread = (pl.col("reward").max() > pl.col("reward").min()).over("prompt_id")
    return samples.filter(spread & (pl.len().over("prompt_id") > 1))


def with_advantages(samples: pl.DataFrame, scale_rewards: str) -> pl.DataFrame:
    """``samples`` with each one's group-relative ``advantage`` (float64, ``group_advantages``)."""
    rewards = torch.tensor(samples["reward"].cast(pl.Float64).to_list(), dtype=torch.float64)
    ids = torch.tensor(samples["prompt_id"].to_list(), dtype=torch.long)
    adv = group_advantages(rewards, ids, scale_rewards) if samples.height else rewards
    return samples.with_columns(pl.Series("advantage", adv.tolist(), dtype=pl.Float64))


def sample_figures(scored: pl.DataFrame) -> dict[str, float | None]:
    """A step's samples before filtering, named as TRL's GRPOTrainer logs them: ``reward_mean``, ``reward_std``
    (the policy's own samples), ``frac_reward_zero_std`` (share of prompts whose rewards are all equal),
    ``completion_length`` (mean tokens) and ``truncated_fraction`` (cut off by ``max_new_tokens``)."""
    rows = own(scored)
    if rows.height == 0:
        return dict.fromkeys(("reward_mean", "reward_std", "frac_reward_zero_std", "completion_length", "truncated_fraction"))
    d = describe(rows["reward"])
    flat = rows.group_by("prompt_id").agg((pl.col("reward").max() == pl.col("reward").min()).alias("flat"))
    return {
        "reward_mean": d["mean"], "reward_std": d["std"], "frac_reward_zero_std": float(flat["flat"].mean()),
        "completion_length": float(rows["num_tokens"].mean()),
        "truncated_fraction": float((rows["finish_reason"] == "length").mean()),
    }


def update_figures(updates: pl.DataFrame) -> dict[str, float]:
    """A step's training figures: the mean of each update's (``UPDATE_FIGURES``) over its updates."""
    present = [name for name in UPDATE_FIGURES if name in updates.columns and updates[name].null_count() < updates.height]
    return {name: float(updates[name].mean()) for name in present}


def train_grpo(
    model_path: str | Path,
    out_dir: str | Path,
    groups: pl.DataFrame,
    cfg: PreferenceConfig,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_update: Callable[[dict[str, float]], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """μ = ``cfg.epochs`` epochs of GRPO updates of the model at ``model_path`` on one step's ``groups``; save it to
    ``out_dir``. Returns the step's metrics and one dict of figures per update (``UPDATE_FIGURES``, ``epoch``).

    ``groups`` has ``prompt_id, prompt, completion, advantage, old_logps, ref_logps`` (per-token lists: those
    ``token_logps`` computes for these completions; ``ref_logps`` null when ``beta`` is 0) and, optionally,
    ``finish_reason`` (a truncated completion is trained without an end token). Each update takes
    ``cfg.batch_size`` whole prompt groups.
    """
    from alignment.preference import load_trainable, rebuild_trainable

    settings = cfg.objective
    if not isinstance(settings, GRPOSettings):
        raise ValueError(f"train_grpo trains the grpo loss; cfg's loss is {cfg.spec.name!r}.")
    missing = [c for c in GROUP_COLUMNS if c not in groups.columns]
    if missing or groups.height == 0:
        raise ValueError(f"Nothing to train on: the groups frame {'lacks ' + ', '.join(missing) if missing else 'is empty'}.")
    hparams, uses_reference = settings.loss_hparams(), settings.uses_reference
    if uses_reference and groups["ref_logps"].null_count():
        raise ValueError("The groups carry no reference log-probs (ref_logps) and beta is not 0; recompute them or set beta: 0.")
    model, tokenizer = load_trainable(model_path, cfg, trust_remote_code)
    fmt = formatter_for(model, tokenizer, cfg.prompt)
    finished = (groups["finish_reason"] != "length").to_list() if "finish_reason" in groups.columns else None
    examples = encode_pairs(tokenizer, groups["prompt"].to_list(), groups["completion"].to_list(), fmt, finished)
    old = [torch.tensor(x, dtype=torch.float32) for x in groups["old_logps"].to_list()]
    ref = [torch.tensor(x, dtype=torch.float32) for x in groups["ref_logps"].to_list()] if uses_reference else None
    for row, ((_, labels), stored) in enumerate(zip(examples, old, strict=True)):
        if sum(label != IGNORE for label in labels) != len(stored):
            raise ValueError(f"Row {row} of the groups has {len(stored)} stored log-probs for a completion of "
                             f"{sum(label != IGNORE for label in labels)} tokens: they were computed with another tokenizer "
                             "or prompt format.")  # fmt: skip
    advantages = torch.tensor(groups["advantage"].to_list(), dtype=torch.float32)
    loss_fn = cfg.spec.fn

    def step_loss(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in rows], fmt.pad_id).items()}
        logps, mask, entropy = batch_token_logps(model, batch, entropy=True)

        def placed(stored: list[torch.Tensor]) -> torch.Tensor:  # row i's values at row i's completion positions
            return torch.zeros_like(logps).masked_scatter(mask, torch.cat([stored[i] for i in rows]).to(logps.device))

        inputs = TokenInputs(logps, placed(old), placed(ref) if ref is not None else None,
                             advantages[rows].to(logps.device), mask)  # fmt: skip
        loss = loss_fn(inputs, **hparams)
        stats = grpo_stats(logps.detach(), inputs.old_logps, inputs.ref_logps, inputs.advantages, mask, **hparams)
        figures = {_STAT_NAMES[k]: v for k, v in stats.items() if k in _STAT_NAMES}
        figures["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
        return loss, figures

    units = groups.with_row_index("_row").group_by("prompt_id", maintain_order=True).agg("_row")["_row"].to_list()
    per_epoch = math.ceil(len(units) / cfg.batch_size)
    updates: list[dict[str, float]] = []

    def record(figures: dict[str, float]) -> None:
        updates.append({"update": len(updates) + 1, "epoch": len(updates) // per_epoch + 1, **figures})
        if on_update is not None:
            on_update(updates[-1])

    losses = train_loop(model, units, step_loss, cfg, lengths=[sum(len(examples[i][0]) for i in u) for u in units],
                        desc="training (grpo)", progress=progress, on_update=record)  # fmt: skip
    save_trained(model, tokenizer, out_dir, cfg, rebuild=lambda: rebuild_trainable(model_path, cfg, trust_remote_code))
    tail = losses[-per_epoch:]
    metrics = {
        "train_loss": sum(tail) / len(tail), "train_steps": float(len(losses)), "train_groups": float(len(units)),
        "train_samples": float(groups.height), **update_figures(pl.DataFrame(updates)),
    }  # fmt: skip
    return metrics, updates
