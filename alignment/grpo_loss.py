"""GRPO's loss: group-relative advantages and the clipped token-level surrogate, with its diagnostics
(``alignment.losses`` re-exports them; ``alignment.loss_table`` declares ``grpo``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# DeepSeekMath (Shao et al., arXiv 2402.03300), Algorithm 1 and Eq. 3, with the k3 KL estimator of
# Eq. 4. Unlike the other losses, ``grpo`` works on per-token log-probs ``[B, T]`` and returns the
# batch's loss (a scalar). Correspondence with TRL 1.16's ``GRPOTrainer`` (tested in
# tests/test_grpo_loss.py): ``loss_agg="sequence"`` is ``loss_type="grpo"``, ``loss_agg="token"`` is
# ``loss_type="bnpo"`` (and ``"dapo"`` on one process without gradient accumulation, where its token
# count is the batch's); ``epsilon``, ``epsilon_high`` and ``beta`` are TRL's (whose ``beta`` defaults
# to 0), with ``use_bias_correction_kl=False`` (TRL's default multiplies the KL term by ρ, after
# DeepSeek-V3.2; Eq. 3 does not), ``importance_sampling_level="token"``, and no entropy masking,
# vLLM importance-sampling correction or ``delta``.

GROUP_STD_EPS = 1e-4  # added to a group's reward std before dividing, as TRL's GRPOTrainer does
GRPO_LOSS_AGGS = ("sequence", "token")
SCALE_REWARDS = ("group", "none")


def group_advantages(rewards: Tensor, group_ids: Tensor, scale_rewards: str = "group") -> Tensor:
    """GRPO's outcome advantage ``Â_i = (r_i − mean(r_g)) / (std(r_g) + 1e-4)`` within each prompt's group
    (DeepSeekMath, arXiv 2402.03300, §4.1.2), one per sample; ``group_ids`` name the prompts as in ``rloo``.

    ``std`` is the unbiased (Bessel-corrected, n − 1) standard deviation, as ``torch.std`` and TRL's
    ``nanstd`` compute it, and 1e-4 is TRL's epsilon, so advantages match TRL's ``scale_rewards="group"``.
    ``scale_rewards="none"`` keeps ``r_i − mean(r_g)``: Dr. GRPO (Liu et al., arXiv 2503.20783) drops the
    std, since dividing by it up-weights the prompts that are nearly always or nearly never solved.

    A group whose rewards are all equal (a group of one included) carries no signal: its advantages are
    exactly 0, where the formula would give rounding noise (e.g. three rewards of 0.1 have a mean that
    differs from 0.1 in the last bit) divided by 1e-4.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}.")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    _, group = torch.unique(group_ids, return_inverse=True)
    count = torch.bincount(group).to(rewards.dtype)
    centred = rewards - (torch.zeros_like(count).index_add_(0, group, rewards) / count)[group]
    if scale_rewards == "group":
        variance = torch.zeros_like(count).index_add_(0, group, centred**2) / (count - 1).clamp(min=1)
        centred = centred / (variance.sqrt() + GROUP_STD_EPS)[group]
    lowest = torch.full_like(count, math.inf).scatter_reduce(0, group, rewards, "amin")
    highest = torch.full_like(count, -math.inf).scatter_reduce(0, group, rewards, "amax")
    return torch.where((lowest == highest)[group], 0.0, centred)


def _grpo_terms(
    logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor,
    epsilon: float, epsilon_high: float | None, with_kl: bool, loss_agg: str,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per token: the clipped surrogate's loss ``−min(ρÂ, clip(ρ, 1−ε, 1+ε_high)Â)``, the k3 KL (or None),
    and the ratio ρ. Masked positions get ρ = 1 and KL 0 before any exp, so padding holding −inf or NaN
    reaches neither the value nor the gradient."""
    if loss_agg not in GRPO_LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {', '.join(GRPO_LOSS_AGGS)}, got {loss_agg!r}.")
    if with_kl and ref_logps is None:
        raise ValueError("grpo with beta > 0 needs ref_logps, the reference policy's per-token log-probs; "
                         "pass them or set beta=0.")  # fmt: skip
    keep = mask.bool()
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(torch.where(keep, logps - old_logps, 0.0))
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + high) * adv)
    kl = None
    if with_kl:
        # k3 = π_ref/π_θ − log(π_ref/π_θ) − 1 (Eq. 4), as expm1(d) − d: exp(d) − d − 1 loses every digit
        # in float32 for the small d of a policy close to its reference.
        d = torch.where(keep, ref_logps - logps, 0.0)
        kl = torch.expm1(d) - d
    return surrogate, kl, ratio


def _grpo_mean(per_token: Tensor, mask: Tensor, loss_agg: str) -> Tensor:
    """``"sequence"``: each sequence's masked token mean, then the mean over sequences (Eq. 3's
    ``1/G Σ_i 1/|o_i| Σ_t``; a sequence without tokens counts as 0); ``"token"``: the sum over every
    unmasked token divided by their number (DAPO, Yu et al., arXiv 2503.14476, §3.3)."""
    weight = mask.to(per_token.dtype)
    if loss_agg == "sequence":
        return ((per_token * weight).sum(-1) / weight.sum(-1).clamp(min=1)).mean()
    return (per_token * weight).sum() / weight.sum().clamp(min=1)


def grpo(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    loss_agg: str = "sequence",
) -> Tensor:
    """The batch's GRPO loss ``−J`` (a scalar), DeepSeekMath (arXiv 2402.03300) Algorithm 1 / Eq. 3:

    ``J = 1/G Σ_i 1/|o_i| Σ_t [min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε_high) Â_i) − β D_KL,t]``,
    ``ρ = exp(logps − old_logps)``, ``D_KL,t = exp(ref − logp) − (ref − logp) − 1`` (k3, Eq. 4).

    ``logps`` (differentiable), ``old_logps`` (π_old, sampling time), ``ref_logps`` (π_ref) and ``mask``
    (1 on completion tokens) are ``[B, T]``; ``advantages`` is ``[B]``, e.g. from ``group_advantages``.
    ``epsilon_high`` (clip-higher, DAPO arXiv 2503.14476 §3.1) defaults to ``epsilon``. ``loss_agg``:
    ``"sequence"`` is Eq. 3, ``"token"`` is DAPO's token-level loss (§3.3). With ``beta=0`` the KL
    term is skipped and ``ref_logps`` may be None.
    """
    surrogate, kl, _ = _grpo_terms(logps, old_logps, ref_logps, advantages, mask, epsilon, epsilon_high,
                                   beta != 0, loss_agg)  # fmt: skip
    return _grpo_mean(surrogate if kl is None else surrogate + beta * kl, mask, loss_agg)


@torch.no_grad()
def grpo_stats(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    loss_agg: str = "sequence",
) -> dict[str, float]:
    """What a GRPO step logs, from ``grpo``'s arguments, under the names TRL 1.16 and verl use.

    - ``loss``: ``grpo(...)``'s value;
    - ``pg_loss``: the clipped surrogate alone, without the KL term, aggregated by ``loss_agg``
      (verl's ``actor/pg_loss``); with ``loss_agg="token"``, ``loss = pg_loss + beta * kl``;
    - ``kl``: the mean k3 KL over all unmasked tokens (TRL's ``kl``), whenever ``ref_logps`` is given;
    - ``clip_ratio/low_mean``: the fraction of unmasked tokens with ``ρ < 1 − ε`` and ``Â < 0`` (the
      clip is active, from below); ``clip_ratio/high_mean``: ``ρ > 1 + ε_high`` and ``Â > 0``;
      ``clip_ratio/region_mean``: either. These are TRL's ``_compute_loss`` definitions (token means
      over the batch); the region is verl's ``actor/pg_clipfrac``.
    """
    surrogate, kl, ratio = _grpo_terms(logps, old_logps, ref_logps, advantages, mask, epsilon, epsilon_high,
                                       beta != 0 or ref_logps is not None, loss_agg)  # fmt: skip
    adv = advantages.unsqueeze(-1)
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + (epsilon if epsilon_high is None else epsilon_high)) & (adv > 0)
    names = ["pg_loss", "loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    values = [_grpo_mean(surrogate, mask, loss_agg),
              _grpo_mean(surrogate if not beta else surrogate + beta * kl, mask, loss_agg),
              *(_grpo_mean(c.to(surrogate.dtype), mask, "token") for c in (low, high, low | high))]  # fmt: skip
    if kl is not None:
        names.append("kl")
        values.append(_grpo_mean(kl, mask, "token"))
    return dict(zip(names, torch.stack(values).tolist()))  # one device sync
