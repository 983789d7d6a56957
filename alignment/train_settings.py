"""How each fine-tuning stage trains: the recipe's ``warm_start``, ``improve`` and ``preference`` sections
(alignment/recipe.py holds the experiment itself).

The preference loss names and their hyperparameters come from ``alignment.loss_table``, which imports
no torch, so a recipe loads in milliseconds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignment import loss_table as _loss_table
from alignment.strict import Strict


class TrainSettings(Strict):
    """Optimiser settings for one fine-tuning stage."""

    epochs: int = Field(3, ge=1, description="Passes over the training data.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    batch_size: int = Field(32, ge=1, description="Examples per optimiser step.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up steps.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Examples per forward pass; gradients accumulate up to batch_size (null = batch_size).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")
    group_by_length: bool = Field(False, description="Batch examples of similar length together (less padding).")
    lora_r: int = Field(0, ge=0, description="LoRA rank (peft adapters, merged before saving); 0 trains all weights.")


class WarmStart(TrainSettings):
    """Behaviour cloning on labelled data: Algorithm 1's "Train pi_theta on D"."""

    enabled: bool = Field(True, description="Run the warm start (skip it for an already-tuned model).")


class ImproveConfig(TrainSettings):
    """Improve: fine-tune on the filtered data."""

    steps: int = Field(1, ge=1, description="I, Improve steps per Grow step (tau rises with each).")
    restart_from_base: bool = Field(
        False, description="ReST-EM: fine-tune from the base policy each Grow step instead of the current one."
    )


# The loss names come from the loss table, which imports no torch (a recipe loads in milliseconds).
LOSS_NAMES = Literal[_loss_table.LOSS_NAMES]  # type: ignore[valid-type]


class PreferenceSettings(TrainSettings):
    """Iterative DPO: how pairs are made and which preference loss trains on them."""

    loss: LOSS_NAMES = Field("dpo", description="Preference loss (alignment.loss_table.LOSSES).")
    beta: float | None = Field(
        None, gt=0, description="The loss's beta; null keeps the loss's default; unused by losses without one "
        f"({', '.join(n for n, s in _loss_table.LOSSES.items() if 'beta' not in s.hparams)})."
    )
    hparams: dict[str, float] = Field(default_factory=dict, description="Other loss hyperparameters, e.g. {gamma: 0.5}.")
    nll_alpha: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen response (pairwise losses, except those "
        f"with their own: {', '.join(n for n, s in _loss_table.LOSSES.items() if s.has_nll)})."
    )
    pairing: Literal["best_vs_worst", "best_vs_random", "all_pairs"] = Field(
        "best_vs_worst", description="How pairs are drawn from the N scored samples of a prompt."
    )
    min_margin: float = Field(0.0, ge=0, description="Drop pairs whose reward margin is below this (ties always dropped).")
    reference: Literal["initial", "previous"] = Field(
        "initial", description="Reference policy: the initial (warm-started) policy or the previous iterate."
    )
    start_from: Literal["previous", "initial"] = Field(
        "previous", description="Warm-start each iteration from the previous iterate or from the initial policy."
    )


    @model_validator(mode="after")
    def _loss_settings(self) -> PreferenceSettings:
        spec = self.spec
        try:
            spec.check(self.loss_hparams(), self.nll_alpha if spec.takes_nll else 0.0)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def spec(self) -> _loss_table.LossSpec:
        """The loss's declaration: what it trains on, what it needs, its hyperparameters."""
        return _loss_table.LOSSES[self.loss]

    def loss_hparams(self) -> dict[str, float]:
        """The loss's hyperparameters: ``hparams``, and ``beta`` when set and the loss takes one."""
        takes_beta = self.beta is not None and "beta" in self.spec.hparams
        return {**self.hparams, **({"beta": self.beta} if takes_beta else {})}


def preference_config(p: PreferenceSettings, seed: int, *, dtype: str = "float32", prompt: dict | None = None):
    """The trainer's config for these settings: beta and the NLL term go only to losses that take them."""
    from alignment.preference import PreferenceConfig
    from alignment.prompting import PromptFormat

    spec = p.spec
    return PreferenceConfig(
        loss=p.loss, beta=p.beta if "beta" in spec.hparams else None, hparams=dict(p.hparams),
        nll_alpha=p.nll_alpha if spec.takes_nll else 0.0, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
        warmup_steps=p.warmup_steps, seed=seed, lora_r=p.lora_r, micro_batch_size=p.micro_batch_size,
        gradient_checkpointing=p.gradient_checkpointing, group_by_length=p.group_by_length,
        dtype=dtype, prompt=PromptFormat.of(prompt),
    )
