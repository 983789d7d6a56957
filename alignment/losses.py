"""Preference losses as pure functions of per-example sequence log-probabilities.

Every loss returns one value per example (shape ``[B]``); the trainer takes the mean. The maths
functions take plain tensors, e.g. ``dpo(chosen_logratio, rejected_logratio, beta)``. Each loss is
declared once in ``alignment.loss_table`` (``LOSSES[name]``: what it reads, its hyperparameters with
defaults and ranges, whether it needs a reference or rewards); ``LOSSES[name].fn(batch, **hparams)``
is the uniform entry point a trainer picks by name, built here by ``entry_point``:

- pairwise losses (``spec.kind == "pairwise"``) read a ``LossInputs``: summed completion log-probs
  of the chosen and rejected responses under the policy and (``spec.needs_reference``) the
  reference model, completion token counts, and (``spec.needs_rewards``) scalar rewards;
- group losses (``spec.kind == "group"``, RLOO) read a ``GroupInputs`` of N samples per prompt with
  their rewards and prompt group ids;
- token-level group losses (``spec.reads == "tokens"``, GRPO, whose maths is ``alignment.grpo_loss``)
  read a ``TokenInputs``: per-token log-probs ``[B, T]`` under the policy, the sampling policy π_old and
  the reference, each sample's advantage and the completion mask, and return the batch's loss (a
  scalar) rather than one per example.

``compute_loss(name, batch, nll_alpha=..., **hparams)`` fills in the declared defaults, rejects
unknown names and out-of-range hyperparameters, and adds the optional NLL term on the chosen response.

Each loss cites the paper that defines it (name, arXiv id, equation where numbered). Notation:
``Δ = log π_θ(y|x) − log π_ref(y|x)`` (a "logratio") and ``h = Δ_w − Δ_l`` (chosen minus rejected).
Names are precise on purpose: ``ipo`` is the IPO paper's loss on summed log-probs, ``ipo_mean`` the
length-normalised variant that TRL ships under the name "ipo".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.grpo_loss import (  # noqa: F401  (GRPO's loss lives there; every loss is found here)
    GROUP_STD_EPS,
    GRPO_LOSS_AGGS,
    SCALE_REWARDS,
    group_advantages,
    grpo,
    grpo_stats,
)
from alignment.loss_table import LOSSES, LossSpec, check_loss, loss_spec

__all__ = ["LOSSES", "GroupInputs", "LossInputs", "LossSpec", "TokenInputs", "check_loss", "compute_loss", "entry_point", "nll",
           "with_nll"]


@dataclass(frozen=True)
class LossInputs:
    """One batch of preference pairs, all tensors of shape ``[B]``.

    Log-probs are summed over completion tokens (EOS included); lengths count those tokens.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None


@dataclass(frozen=True)
class GroupInputs:
    """N sampled completions per prompt: ``logps[i]`` (summed, under the policy), ``rewards[i]``,
    and ``group_ids[i]`` naming the prompt (any integers; rows of one group need not be adjacent)."""

    logps: Tensor
    rewards: Tensor
    group_ids: Tensor


@dataclass(frozen=True)
class TokenInputs:
    """A group's completions token by token, ``[B, T]``: ``logps`` under the policy (differentiable),
    ``old_logps`` under the policy that sampled them, ``ref_logps`` under the reference (None when the
    loss's reference weight is 0), ``mask`` 1 on completion tokens; and ``advantages`` ``[B]``."""

    logps: Tensor
    old_logps: Tensor
    ref_logps: Tensor | None
    advantages: Tensor
    mask: Tensor


# --- The GPO family, f(β·h) for a convex f (GPO, Tang et al., arXiv 2402.05749) -------------------


def dpo(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float = 0.1) -> Tensor:
    """Logistic loss, DPO: ``−log σ(β·(Δ_w − Δ_l))`` (arXiv 2305.18290, Eq. 7; GPO f(x) = log(1 + e^−x))."""
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


def hinge(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float = 0.1) -> Tensor:
    """SLiC-HF hinge: ``max(0, 1 − β·h)`` (GPO). SLiC-HF's calibration loss (arXiv 2305.10425) is
    ``max(0, δ − h)`` on raw log-probs; this is β·that with δ = 1/β and reference-adjusted h."""
    return torch.relu(1 - beta * (chosen_logratio - rejected_logratio))


def ipo(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float = 0.1) -> Tensor:
    """IPO on summed log-probs: ``(h − 1/(2β))²`` (arXiv 2310.12036, the empirical IPO loss)."""
    return (chosen_logratio - rejected_logratio - 1 / (2 * beta)) ** 2


def exponential(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float = 0.1) -> Tensor:
    """Exponential (AdaBoost-like) GPO loss: ``exp(−β·h)`` (arXiv 2402.05749)."""
    return torch.exp(-beta * (chosen_logratio - rejected_logratio))


def truncated_quadratic(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float = 0.1) -> Tensor:
    """Truncated quadratic GPO loss: ``max(0, 1 − β·h)²`` (arXiv 2402.05749)."""
    return torch.relu(1 - beta * (chosen_logratio - rejected_logratio)) ** 2


def savage(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float = 0.1) -> Tensor:
    """Savage GPO loss: ``1/(1 + exp(β·h))² = σ(−β·h)²`` (arXiv 2402.05749)."""
    return torch.sigmoid(-beta * (chosen_logratio - rejected_logratio)) ** 2


# --- Reference-free losses on length-normalised log-probs ------------------------------------


def simpo(chosen_avg_logp: Tensor, rejected_avg_logp: Tensor, beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    """SimPO: ``−log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)`` (arXiv 2405.14734).

    Takes the per-token mean log-probs ``log π(y)/|y|``; no reference model.
    """
    return -F.logsigmoid(beta * (chosen_avg_logp - rejected_avg_logp) - gamma)


def orpo(chosen_avg_logp: Tensor, rejected_avg_logp: Tensor, lam: float = 0.1) -> Tensor:
    """ORPO: ``L_SFT + λ·L_OR`` (arXiv 2403.07691) with ``L_OR = −log σ(log odds(y_w) − log odds(y_l))``.

    ``odds(y) = p/(1 − p)`` with ``p = exp(mean token log-prob)``; ``L_SFT`` is the chosen NLL
    averaged over its tokens. No reference model.
    """
    log_odds_ratio = _log_odds(chosen_avg_logp) - _log_odds(rejected_avg_logp)
    return -chosen_avg_logp - lam * F.logsigmoid(log_odds_ratio)


def _log_odds(avg_logp: Tensor) -> Tensor:
    """``log(p/(1 − p))`` for ``p = exp(avg_logp)``, stable as p → 0 and as p → 1."""
    return avg_logp - _log1mexp(avg_logp)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − e^x)`` for x < 0 (Mächler 2012): ``log(−expm1 x)`` near 0, ``log1p(−e^x)`` below −log 2.

    x is clamped just below 0 so that both branches, and hence ``torch.where``'s gradient, stay finite
    when a completion's probability rounds to 1.
    """
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --- Unpaired, reward-regression and on-policy losses ----------------------------------------


def kto(
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> Tensor:
    """KTO: ``λ_y − v(x, y)`` (arXiv 2402.01306), chosen = desirable, rejected = undesirable.

    ``v_D = λ_D·σ(β(Δ_w − z0))`` and ``v_U = λ_U·σ(β(z0 − Δ_l))``. The KL reference point ``z0``
    is ``max(0, mean Δ)`` over the batch's chosen and rejected completions, detached, as in the KTO
    paper's implementation (which estimates it on mismatched prompt/completion pairs instead). Each
    pair holds two unpaired examples, so the per-pair value is their mean: the batch mean is then the
    mean over all 2B examples. Because z0 is a batch statistic, sharding the batch changes it.
    """
    z0 = torch.cat([chosen_logratio, rejected_logratio]).mean().clamp(min=0).detach()
    desirable = lambda_d * (1 - torch.sigmoid(beta * (chosen_logratio - z0)))
    undesirable = lambda_u * (1 - torch.sigmoid(beta * (z0 - rejected_logratio)))
    return (desirable + undesirable) / 2


def rebel(
    chosen_logratio: Tensor,
    rejected_logratio: Tensor,
    chosen_reward: Tensor,
    rejected_reward: Tensor,
    eta: float = 1.0,
) -> Tensor:
    """REBEL: ``(1/η·(Δ_w − Δ_l) − (r_w − r_l))²`` (arXiv 2404.16767, Eq. 1), the reference being π_θt,
    the policy at the start of the iteration."""
    return ((chosen_logratio - rejected_logratio) / eta - (chosen_reward - rejected_reward)) ** 2


def rloo(logps: Tensor, rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE with a leave-one-out baseline (RLOO, arXiv 2402.14740): ``−A_i·log π(y_i)``,
    ``A_i = r_i − 1/(k−1)·Σ_{j≠i} r_j`` over the k samples of the same prompt; A is a constant.

    RLOO's KL-shaped reward ``r − β·log(π/π_ref)`` is left to the caller: pass it as ``rewards``.
    """
    _, group = torch.unique(group_ids, return_inverse=True)
    count = torch.bincount(group).to(rewards.dtype)
    if bool((count < 2).any()):
        raise ValueError("rloo needs at least 2 samples per prompt (group id) to form a leave-one-out baseline.")
    total = torch.zeros_like(count).index_add_(0, group, rewards)
    baseline = (total[group] - rewards) / (count[group] - 1)
    return -(rewards - baseline).detach() * logps


# --- The uniform entry point -----------------------------------------------------------------


def _need(batch: LossInputs, *fields: str) -> list[Tensor]:
    """The named fields of ``batch``; a missing one is an error that says what to provide."""
    values = [getattr(batch, name) for name in fields]
    missing = [name for name, value in zip(fields, values) if value is None]
    if missing:
        raise ValueError(f"This loss needs LossInputs.{', '.join(missing)}; the batch has None there.")
    return values


def _logratios(b: LossInputs) -> tuple[Tensor, Tensor]:
    ref_chosen, ref_rejected = _need(b, "ref_chosen_logps", "ref_rejected_logps")
    return b.policy_chosen_logps - ref_chosen, b.policy_rejected_logps - ref_rejected


def _avg_logps(b: LossInputs) -> tuple[Tensor, Tensor]:
    chosen_len, rejected_len = _need(b, "chosen_lengths", "rejected_lengths")
    return b.policy_chosen_logps / chosen_len, b.policy_rejected_logps / rejected_len


def _avg_logratios(b: LossInputs) -> tuple[Tensor, Tensor]:
    chosen, rejected = _logratios(b)
    chosen_len, rejected_len = _need(b, "chosen_lengths", "rejected_lengths")
    return chosen / chosen_len, rejected / rejected_len


_READERS: dict[str, Callable[[LossInputs], tuple[Tensor, Tensor]]] = {
    "logratios": _logratios,
    "avg_logratios": _avg_logratios,
    "avg_logps": _avg_logps,
}


def entry_point(spec: LossSpec) -> Callable[..., Tensor]:
    """``fn(batch, **hparams)`` for a declared loss: its maths function on what ``spec.reads`` from the batch."""
    maths = _MATHS[spec.function]
    if spec.reads == "tokens":
        return lambda b, **hp: maths(b.logps, b.old_logps, b.ref_logps, b.advantages, b.mask, **hp)
    if spec.kind == "group":
        return lambda g, **hp: maths(g.logps, g.rewards, g.group_ids, **hp)
    read = _READERS[spec.reads]
    if spec.needs_rewards:
        return lambda b, **hp: maths(*read(b), *_need(b, "chosen_rewards", "rejected_rewards"), **hp)
    return lambda b, **hp: maths(*read(b), **hp)


# The maths functions the table may name. A loss function added here without a LossSpec in
# alignment.loss_table (or a LossSpec naming a function not here) fails at import.
_MATHS: dict[str, Callable[..., Tensor]] = {
    f.__name__: f for f in (dpo, hinge, ipo, exponential, truncated_quadratic, savage, simpo, orpo, kto, rebel, rloo, grpo)
}
_undeclared = set(_MATHS) - {spec.function for spec in LOSSES.values()}
_unknown = {spec.name: spec.function for spec in LOSSES.values() if spec.function not in _MATHS}
if _undeclared or _unknown:
    raise ImportError(f"alignment.loss_table and alignment.losses disagree: undeclared {sorted(_undeclared)}, "
                      f"declared without a function {_unknown}.")


def nll(batch: LossInputs) -> Tensor:
    """Per-token NLL of the chosen response, ``−log π(y_w|x)/|y_w|`` (the SFT loss)."""
    (chosen_len,) = _need(batch, "chosen_lengths")
    return -batch.policy_chosen_logps / chosen_len


def with_nll(losses: Tensor, batch: LossInputs, alpha: float) -> Tensor:
    """Add ``α·NLL(y_w)`` to per-example pairwise losses (the RPO / DPO+NLL regulariser)."""
    return losses + alpha * nll(batch) if alpha else losses


def compute_loss(name: str, batch: LossInputs | GroupInputs | TokenInputs, *, nll_alpha: float = 0.0,
                 **hparams: float | str | None) -> Tensor:
    """Per-example losses of loss ``name`` with its declared defaults, plus ``nll_alpha``·NLL (a token-level
    loss: the batch's loss)."""
    spec = loss_spec(name)
    spec.check(hparams, nll_alpha)
    expected = TokenInputs if spec.reads == "tokens" else GroupInputs if spec.kind == "group" else LossInputs
    if not isinstance(batch, expected):
        raise TypeError(f"Loss {name!r} takes {expected.__name__}, got {type(batch).__name__}.")
    return with_nll(spec.fn(batch, **{**spec.defaults(), **hparams}), batch, nll_alpha)
