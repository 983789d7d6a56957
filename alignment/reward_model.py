"""Learned rewards: a Bradley–Terry reward model and its pairwise accuracy.

The reward model ``r_phi(x, y)`` is a causal LM with a scalar head read at the last token (Hugging
Face ``AutoModelForSequenceClassification`` with ``num_labels=1``), initialised from a policy
checkpoint: the backbone loads, the head is new. It is fitted by maximum likelihood under the
Bradley–Terry model (the reward-model loss of DPO, arXiv 2305.18290, Eq. 2):

    log p_ij / (1 - p_ij) = r(x, y_i; phi) - r(x, y_j; phi)   =>   p_ij = sigma(r(x, y_i) - r(x, y_j))
    max_phi  sum_{(x, y_w, y_l) in D} log sigma(r(x, y_w; phi) - r(x, y_l; phi))

(the same MLE as Xiong et al., arXiv 2312.11456). A trained model is a reward like any other:
``RewardModel(path)(prompts, completions, references) -> list[float]``. Its scale is arbitrary
(BT is invariant to adding a constant), so filter its scores with scale-free rules such as
``filter.kind: quantile`` (``filters.quantile_threshold``) rather than fixed thresholds.

Ensembles of rewards (pessimism by ensemble) and reward specs (``rm:PATH``) live in
``alignment.rewards``, which imports no model library; a spec loads this module only for ``rm:``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from alignment.models import default_device, load_tokenizer
from alignment.progress import Ticker
from alignment.rewards import RewardFn, score
from alignment.prompting import Formatter
from alignment.train_settings import RewardModelConfig
from alignment.training import autocast, encode_pairs, train_loop


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-log sigma(r_w - r_l)``: the negative Bradley–Terry log-likelihood (arXiv 2305.18290, Eq. 2)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def load_reward_model(
    path: str | Path, *, device: str | None = None, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)``: a one-output sequence classifier from a local causal-LM or reward-model directory."""
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    # The classifier scores the rightmost non-pad token, so it needs to know which id pads.
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
    )
    model.to(device or default_device())
    return model, tokenizer


def train_reward_model(
    base_path: str | Path,
    out_dir: str | Path,
    pairs: pl.DataFrame,
    cfg: RewardModelConfig | None = None,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Fit ``r_phi`` on ``pairs`` (prompt, chosen, rejected) by Bradley–Terry MLE and save it to ``out_dir``.

    Each step scores the chosen and rejected sequences of a batch in one forward pass and minimises
    the mean of ``-log sigma(r_w - r_l)``. Returns the last epoch's mean loss and
    pairwise training accuracy, the step count and the pair count.
    """
    cfg = cfg or RewardModelConfig()
    _check_pairs(pairs)
    torch.manual_seed(cfg.seed)  # before loading: the new score head is initialised here
    model, tokenizer = load_reward_model(base_path, trust_remote_code=trust_remote_code)
    model.train()
    prompts = pairs["prompt"].to_list()
    chosen = _encode(tokenizer, prompts, pairs["chosen"].to_list(), model.config)
    rejected = _encode(tokenizer, prompts, pairs["rejected"].to_list(), model.config)
    wins: list[float] = []

    def step_loss(rows: list[int]) -> torch.Tensor:
        r_w, r_l = _rewards(model, [chosen[i] for i in rows] + [rejected[i] for i in rows], tokenizer, cfg.dtype)
        wins.append((r_w > r_l).float().mean().item())
        return bradley_terry_loss(r_w, r_l).mean()

    # The one training loop of flywheel (alignment.training.train_loop); only the objective is the reward model's.
    lengths = [len(chosen[i]) + len(rejected[i]) for i in range(pairs.height)]
    losses = train_loop(model, [[i] for i in range(pairs.height)], step_loss, cfg, lengths=lengths, desc="reward model",
                        progress=progress, on_step=on_step)
    steps_per_epoch = math.ceil(pairs.height / cfg.batch_size)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "train_loss": statistics.fmean(losses[-steps_per_epoch:]),
        "train_accuracy": statistics.fmean(wins[-steps_per_epoch:]),
        "train_steps": float(len(losses)),
        "train_pairs": float(pairs.height),
    }


class RewardModel:
    """A trained reward model as a reward function ``(prompts, completions, references) -> list[float]``.

    Sequences are scored ``batch_size`` at a time in order of length, so a batch holds similar
    lengths and little padding; scores come back in the caller's order. Right padding keeps every
    token's position, so a score does not depend on the batch it lands in. References are unused.
    """

    def __init__(
        self, path: str | Path, batch_size: int = 64, *, device: str | None = None, trust_remote_code: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.path = Path(path)
        self.batch_size = batch_size
        self.model, self.tokenizer = load_reward_model(path, device=device, trust_remote_code=trust_remote_code)
        self.model.eval()

    def __repr__(self) -> str:
        return f"RewardModel({str(self.path)!r})"

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
        encoded = _encode(self.tokenizer, prompts, completions, self.model.config)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        tick = Ticker(len(encoded), "completions scored")  # a large Grow takes a reward model a while too
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            values = self.model(**_collate([encoded[i] for i in rows], self.tokenizer.pad_token_id, self.model.device))
            for i, value in zip(rows, values.logits[:, 0].float().tolist(), strict=True):
                scores[i] = value
            tick(start + len(rows))
        return scores


def pairwise_accuracy(reward_fn: RewardFn, pairs: pl.DataFrame) -> float:
    """Fraction of pairs with ``r(x, chosen) > r(x, rejected)``: a tie counts as a miss."""
    _check_pairs(pairs, ("prompt", "reference", "chosen", "rejected"))
    n = pairs.height
    prompts, references = pairs["prompt"].to_list(), pairs["reference"].to_list()
    completions = pairs["chosen"].to_list() + pairs["rejected"].to_list()
    rewards = score(reward_fn, prompts * 2, completions, references * 2)
    return sum(w > l for w, l in zip(rewards[:n], rewards[n:], strict=True)) / n


def _check_pairs(pairs: pl.DataFrame, columns: Sequence[str] = ("prompt", "chosen", "rejected")) -> None:
    missing = [c for c in columns if c not in pairs.columns]
    if missing:
        raise ValueError(f"The pairs frame lacks column(s) {missing}; build it with alignment.pairs.make_pairs.")
    if pairs.height == 0:
        raise ValueError("No preference pairs: every prompt's samples tied; sample more or lower min_margin.")


def _encode(tokenizer, prompts: Sequence[str], completions: Sequence[str], config) -> list[list[int]]:
    """Token ids of prompt + completion + EOS, tokenised as the policy sees them (``training.encode_pairs``)."""
    fmt = Formatter(tokenizer, None, model_config=None)
    encoded = [ids for ids, _ in encode_pairs(tokenizer, list(prompts), list(completions), fmt)]
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]), default=None)
    if limit is not None and longest is not None and len(encoded[longest]) > limit:
        raise ValueError(
            f"A prompt + completion is {len(encoded[longest])} tokens but the model reads at most {limit} "
            f"(prompt {prompts[longest]!r}); shorten max_new_tokens or use a model with more positions."
        )
    return encoded


def _collate(sequences: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad: every real token keeps its position, and the head reads the rightmost non-pad token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _rewards(model, sequences: list[list[int]], tokenizer, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a batch laid out as chosen then rejected, split into ``(r_w, r_l)``."""
    with autocast(model.device, dtype):
        scores = model(**_collate(sequences, tokenizer.pad_token_id, model.device)).logits[:, 0].float()
    half = len(sequences) // 2
    return scores[:half], scores[half:]
