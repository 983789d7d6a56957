"""Training bodies that tests run as ranks (``tasks.launch.run_ranks``) and in one process, to compare them.

Each body trains the tiny model with the one training loop and returns the per-step losses that rank 0
saw; the trained weights land in ``out_dir`` as a plain Hugging Face folder. Module-level functions,
so a rank imports them by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from alignment.grpo import train_grpo
from alignment.preference import train_preference
from alignment.train_settings import GRPOSettings, LossSettings, PreferenceConfig, TrainConfig
from alignment.training import sft


def sft_losses(model_dir: str, out_dir: str, prompts: list[str], completions: list[str], settings: dict) -> list[float]:
    losses: list[float] = []
    cfg = TrainConfig(**settings)
    sft(model_dir, out_dir, prompts, completions, cfg, progress=False, on_step=lambda _, loss: losses.append(loss))
    return losses


def dpo_losses(model_dir: str, out_dir: str, pairs_path: str, settings: dict) -> list[float]:
    losses: list[float] = []
    cfg = PreferenceConfig(**settings, objective=LossSettings(loss="dpo", beta=0.1))
    train_preference(model_dir, out_dir, pl.read_parquet(pairs_path), cfg, progress=False,
                     on_step=lambda _, loss: losses.append(loss))
    return losses


def grpo_losses(model_dir: str, out_dir: str, groups_path: str, settings: dict) -> list[float]:
    """GRPO updates on stored groups (clipped ratio and the KL term both active); each unit is a prompt's group."""
    cfg = PreferenceConfig(**settings, objective=GRPOSettings(beta=0.04, epsilon=0.2))
    _, updates = train_grpo(model_dir, out_dir, pl.read_parquet(groups_path), cfg, progress=False)
    return [u["loss"] for u in updates]


def cases(model_dir: str, out_root: str, prompts: list[str], completions: list[str], pairs_path: str,
          settings: dict, lora: dict, groups_path: str, grpo_settings: dict) -> dict[str, list[float]]:
    """Every case the world-size comparison checks, in one launch (the strategy is each config's own):
    SFT, DPO and GRPO under DDP and FSDP, and SFT with LoRA and gradient checkpointing under both."""
    out: dict[str, list[float]] = {}
    for strategy in ("ddp", "fsdp"):
        root = Path(out_root)
        out[f"grpo-{strategy}"] = grpo_losses(model_dir, str(root / f"grpo-{strategy}"), groups_path,
                                              {**grpo_settings, "strategy": strategy})
        out[f"sft-{strategy}"] = sft_losses(model_dir, str(root / f"sft-{strategy}"), prompts, completions,
                                            {**settings, "strategy": strategy})
        out[f"dpo-{strategy}"] = dpo_losses(model_dir, str(root / f"dpo-{strategy}"), pairs_path, {**settings, "strategy": strategy})
        out[f"lora-{strategy}"] = sft_losses(model_dir, str(root / f"lora-{strategy}"), prompts, completions,
                                             {**settings, **lora, "strategy": strategy})
    out["reference"] = reference_logps(model_dir, pairs_path, {**settings, "strategy": "ddp"})
    return out


def reference_logps(model_dir: str, pairs_path: str, settings: dict) -> list[float]:
    """The reference pass of the pair stage (each rank scores its block of pairs under a launch), flattened."""
    from alignment.preference import reference_logps_for

    cfg = PreferenceConfig(**settings, objective=LossSettings(loss="dpo", beta=0.1))
    pairs = pl.read_parquet(pairs_path).drop("ref_chosen_logp", "ref_rejected_logp")
    scored = reference_logps_for(pairs, cfg, lambda: model_dir)
    return scored["ref_chosen_logp"].to_list() + scored["ref_rejected_logp"].to_list()


def train_until_killed(model_dir: str, out_dir: str, prompts: list[str], completions: list[str], settings: dict) -> list[float]:
    """SFT for as long as the settings say, after leaving this rank's pid where the test can find it (to kill it)."""
    import torch.distributed as dist

    Path(out_dir).parent.joinpath(f"rank{dist.get_rank()}.pid").write_text(str(os.getpid()))
    return sft_losses(model_dir, out_dir, prompts, completions, settings)
