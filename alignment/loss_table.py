"""The preference losses, each declared once: what it reads, its hyperparameters, what it needs.

This module imports no torch, so a recipe is validated against it in milliseconds. The maths lives in
``alignment.losses``, which builds each loss's entry point from its declaration here; ``spec.fn``
imports it on first use. Everything else asks the table a question (``spec.kind == "group"``,
``spec.needs_reference``) instead of testing a loss's name.

What a loss reads (``reads``) decides the rest:

- ``logratios``: ``Δ = log π_θ(y|x) − log π_ref(y|x)`` of chosen and rejected (needs a reference);
- ``avg_logratios``: the same per completion token (needs a reference and lengths);
- ``avg_logps``: per-token mean ``log π_θ(y|x)`` (reference-free);
- ``group``: N samples per prompt with rewards (not pairwise: trains on the scored samples);
- ``tokens``: a group's samples token by token under the policy, the policy that sampled them (π_old)
  and the reference, with each sample's advantage (GRPO: trains on the ``groups`` its own loop writes).

A hyperparameter is a number with a range, a number that may stay unset (a ``None`` default: the loss
derives it), or a string among ``choices``; ``at_least`` names another hyperparameter it may not be
below. A loss whose reference term has a weight (``reference_weight``) reads no reference at weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Reads = Literal["logratios", "avg_logratios", "avg_logps", "group", "tokens"]
Value = float | str | None


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its default and the open (``gt``) or closed (``ge``) lower bound of its range.

    ``choices`` makes it a string, one of them; a ``None`` default makes it optional (unset, the loss
    derives it); ``at_least`` names another hyperparameter of the same loss that it may not be below.
    """

    default: Value
    gt: float | None = None
    ge: float | None = None
    help: str = ""
    choices: tuple[str, ...] = ()
    at_least: str | None = None

    def problem(self, value: Value) -> str | None:
        """Why ``value`` is out of range, or None."""
        if self.choices:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}"
        if value is None:
            return None if self.default is None else "must be a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
        if self.gt is not None and not value > self.gt:
            return f"must be > {self.gt:g}"
        if self.ge is not None and not value >= self.ge:
            return f"must be >= {self.ge:g}"
        return None


@dataclass(frozen=True)
class LossSpec:
    """Everything the code needs to know about one loss.

    ``function`` names the maths function in ``alignment.losses`` (``ipo_mean`` is ``ipo`` on other
    inputs); ``needs_rewards`` adds the chosen and rejected rewards (or the group's rewards) to its
    arguments; ``has_nll`` marks a loss that already carries an NLL term on the chosen response;
    ``reference_weight`` names the hyperparameter that weights a term against a reference policy.
    """

    name: str
    function: str
    reads: Reads
    hparams: dict[str, HParam] = field(default_factory=dict)
    needs_rewards: bool = False
    has_nll: bool = False
    compared: bool = False  # a row of the README's comparison table (``make compare``)
    cite: str = ""  # the paper that defines it (name, arXiv id, equation where numbered)
    reference_weight: str | None = None

    @property
    def kind(self) -> Literal["pairwise", "group"]:
        return "group" if self.reads in ("group", "tokens") else "pairwise"

    @property
    def trains_on(self) -> Literal["pairs", "scored", "groups"]:
        """The lake table it trains on: the ``pairs`` stage, a group loss's ``scored`` samples, or the
        ``groups`` (with per-token log-probs) of a loss that reads ``tokens``."""
        if self.reads == "tokens":
            return "groups"
        return "scored" if self.kind == "group" else "pairs"

    @property
    def needs_reference(self) -> bool:
        """It reads the reference policy's log-probs: pairs carry ``ref_chosen_logp, ref_rejected_logp``, groups
        their per-token ``ref_logps`` (unless ``uses_reference`` says the weight is 0)."""
        return self.reads in ("logratios", "avg_logratios") or self.reference_weight is not None

    def uses_reference(self, hparams: dict[str, Value]) -> bool:
        """Whether training with ``hparams`` reads the reference: ``needs_reference``, and its weight is not 0."""
        if self.reference_weight is None:
            return self.needs_reference
        return {**self.defaults(), **hparams}[self.reference_weight] != 0

    @property
    def takes_nll(self) -> bool:
        """An ``nll_alpha`` NLL term may be added: pairwise losses without their own."""
        return self.kind == "pairwise" and not self.has_nll

    def defaults(self) -> dict[str, Value]:
        return {name: hp.default for name, hp in self.hparams.items()}

    @property
    def fn(self) -> Any:
        """The entry point ``fn(batch, **hparams) -> per-example losses`` (imports torch)."""
        from alignment.losses import entry_point

        return entry_point(self)

    def check(self, hparams: dict[str, Value], nll_alpha: float = 0.0) -> None:
        """Raise a ValueError that names the fix if ``hparams`` or ``nll_alpha`` don't fit this loss."""
        unknown = sorted(set(hparams) - set(self.hparams))
        if unknown:
            allowed = ", ".join(sorted(self.hparams)) or "none"
            raise ValueError(
                f"Loss {self.name!r} has no hyperparameter {', '.join(unknown)}; its hyperparameters: {allowed}."
            )
        for name, value in hparams.items():
            why = self.hparams[name].problem(value)
            if why:
                raise ValueError(f"Loss {self.name!r}: {name} {why}, got {value!r}.")
        given = {**self.defaults(), **hparams}
        for name, value in given.items():
            floor = self.hparams[name].at_least
            if floor is not None and value is not None and given[floor] is not None and value < given[floor]:
                raise ValueError(f"Loss {self.name!r}: {name} must be >= {floor} ({given[floor]!r}), got {value!r}.")
        if nll_alpha and not self.takes_nll:
            raise ValueError(f"nll_alpha applies to pairwise losses without their own NLL term; set it to 0 for {self.name!r}.")


def _beta(default: float = 0.1) -> dict[str, HParam]:
    return {"beta": HParam(default, gt=0, help="inverse temperature of the margin")}


_DECLARED = (
    # The GPO family, f(β·h) for a convex f (GPO, Tang et al., arXiv 2402.05749).
    LossSpec("dpo", "dpo", "logratios", _beta(), compared=True, cite="DPO, arXiv 2305.18290, Eq. 7"),
    LossSpec("hinge", "hinge", "logratios", _beta(), compared=True, cite="SLiC-HF, arXiv 2305.10425"),
    LossSpec("ipo", "ipo", "logratios", _beta(), compared=True, cite="IPO, arXiv 2310.12036, empirical IPO loss"),
    # TRL's "ipo": the same squared loss on per-token mean logratios.
    LossSpec("ipo_mean", "ipo", "avg_logratios", _beta()),
    LossSpec("exponential", "exponential", "logratios", _beta(), cite="GPO, arXiv 2402.05749"),
    LossSpec("truncated_quadratic", "truncated_quadratic", "logratios", _beta(), cite="GPO, arXiv 2402.05749"),
    LossSpec("savage", "savage", "logratios", _beta(), cite="GPO, arXiv 2402.05749"),
    # Reference-free, on length-normalised log-probs.
    LossSpec("simpo", "simpo", "avg_logps", {**_beta(2.0), "gamma": HParam(1.0, ge=0, help="target margin")}, compared=True,
             cite="SimPO, arXiv 2405.14734"),
    LossSpec("orpo", "orpo", "avg_logps", {"lam": HParam(0.1, ge=0, help="weight of the odds-ratio term")},
             has_nll=True, compared=True, cite="ORPO, arXiv 2403.07691"),
    # Unpaired, reward-regression and on-policy.
    LossSpec("kto", "kto", "logratios", {**_beta(), "lambda_d": HParam(1.0, ge=0, help="weight of desirable examples"),
                                         "lambda_u": HParam(1.0, ge=0, help="weight of undesirable examples")},
             compared=True, cite="KTO, arXiv 2402.01306"),
    LossSpec("rebel", "rebel", "logratios", {"eta": HParam(1.0, gt=0, help="step size")}, needs_rewards=True,
             cite="REBEL, arXiv 2404.16767, Eq. 1"),
    LossSpec("rloo", "rloo", "group", needs_rewards=True, compared=True, cite="RLOO, arXiv 2402.14740"),
    # Token-level, on a group's samples with their advantages: GRPO's own loop (flows/grpo.py).
    LossSpec("grpo", "grpo", "tokens", {
        "epsilon": HParam(0.2, gt=0, help="clip range: the ratio pi/pi_old is kept within [1 - epsilon, 1 + epsilon_high]"),
        "epsilon_high": HParam(None, gt=0, at_least="epsilon", help="upper clip range (DAPO's clip-higher); null = epsilon"),
        "beta": HParam(0.04, ge=0, help="weight of the k3 KL to the reference; 0 skips the reference pass"),
        "loss_agg": HParam("sequence", choices=("sequence", "token"),
                           help="sequence: each completion's token mean, then the mean (Eq. 3); token: DAPO's token mean"),
    }, reference_weight="beta", cite="DeepSeekMath, arXiv 2402.03300, Eq. 3 and Algorithm 1"),
)

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _DECLARED}
LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)
COMPARED: tuple[str, ...] = tuple(name for name, spec in LOSSES.items() if spec.compared)


def loss_spec(name: str) -> LossSpec:
    """The declaration of loss ``name``; an unknown name is a ValueError that lists the choices."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"Unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}.") from None


def check_loss(name: str, hparams: dict[str, Value], nll_alpha: float = 0.0) -> None:
    """Raise a ValueError that names the fix if ``name``, ``hparams`` or ``nll_alpha`` don't fit together."""
    loss_spec(name).check(hparams, nll_alpha)
