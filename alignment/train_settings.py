"""How each fine-tuning stage trains, as one hierarchy: the recipe's training sections (``warm_start``,
``improve``, ``preference``) and the trainer configs they become (alignment/recipe.py holds the
experiment itself).

    TrainSettings             epochs, lr, batch sizes, warm-up, gradient checkpointing, LoRA rank
    ├── WarmStart             the recipe's warm_start
    ├── ImproveConfig         the recipe's improve
    ├── PreferenceSettings    the recipe's preference: pairing, and the loss (LossSettings)
    ├── GRPOSettings          the recipe's grpo: steps, prompts per step, reference, and the grpo loss (LossSettings)
    └── TrainConfig           what alignment.training.train_loop reads: + seed, dtype, prompt format, AdamW, LoRA,
                              and the data-parallel strategy (the recipe's distributed section, DistributedConfig)
        ├── PreferenceConfig  + the loss (its LossSettings) and the no-grad batch size
        └── RewardModelConfig

``trainer_config(recipe, stage, seed)`` is the one conversion from a recipe to a trainer config (a loss
section, ``preference`` or ``grpo``, becomes a ``PreferenceConfig``): a
setting that applies to every training stage is a field of ``TrainConfig`` filled in there, once. A
loss and its hyperparameters are checked once, against ``alignment.loss_table``, when their
``LossSettings`` are built (a recipe loads); training never checks them again.

Nothing here imports torch, so a recipe loads in milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import ConfigDict, Field, model_validator

from alignment import loss_table as _loss_table
from alignment.prompting import PromptFormat
from alignment.strict import Strict

if TYPE_CHECKING:
    from alignment.recipe import Recipe


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


class LossSettings(Strict):
    """A loss of the loss table and its hyperparameters, checked against the loss's declaration when built."""

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

    @model_validator(mode="after")
    def _fits_the_loss(self) -> LossSettings:
        self.spec.check(self.loss_hparams(), self.nll_weight)
        return self

    @property
    def spec(self) -> _loss_table.LossSpec:
        """The loss's declaration: what it trains on, what it needs, its hyperparameters."""
        return _loss_table.LOSSES[self.loss]

    def loss_hparams(self) -> dict[str, float]:
        """The loss function's keyword arguments: ``hparams``, and ``beta`` when set and the loss takes one.

        A beta is left out for a loss without one, so ``--set preference.loss=orpo`` needs no other edit.
        """
        takes_beta = self.beta is not None and "beta" in self.spec.hparams
        return {**self.hparams, **({"beta": self.beta} if takes_beta else {})}

    @property
    def nll_weight(self) -> float:
        """``nll_alpha`` for a loss that takes the NLL term (``spec.takes_nll``), else 0 (left out like beta)."""
        return self.nll_alpha if self.spec.takes_nll else 0.0


class PreferenceSettings(LossSettings, TrainSettings):
    """Iterative DPO: how pairs are made and which preference loss trains on them."""

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
    def _trains_on_pairs_or_samples(self) -> PreferenceSettings:
        if self.spec.trains_on == "groups":
            raise ValueError(f"loss {self.loss!r} trains in its own loop: set algorithm: {self.loss} and its settings "
                             f"in the {self.loss} section")
        return self


_GRPO = _loss_table.LOSSES["grpo"].hparams  # the loss's declared defaults and ranges: declared once, in the table


class GRPOSettings(LossSettings, TrainSettings):
    """GRPO (DeepSeekMath, arXiv 2402.03300, Algorithm 1): M steps per iteration, each sampling a batch of
    prompts, G completions per prompt (``grow.samples_per_prompt``), and μ epochs (``epochs``) of updates of
    the clipped objective on them, ``batch_size`` prompt groups per update. The loss's hyperparameters are
    checked against its declaration in alignment.loss_table when the recipe loads."""

    loss: Literal["grpo"] = Field("grpo", description="The group-relative clipped objective (alignment.loss_table).")
    steps_per_iteration: int = Field(4, ge=1, description="M, steps per iteration (each: sample, score, update).")
    prompts_per_step: int = Field(64, ge=1, description="The batch D_b: prompts sampled (without replacement) per step.")
    reference: Literal["initial", "iteration"] = Field(
        "iteration", description="pi_ref: reset to the policy at the start of every iteration (Algorithm 1), or the "
        "initial (warm-started) policy throughout.",
    )
    epsilon: float = Field(_GRPO["epsilon"].default, description=_GRPO["epsilon"].help + " (> 0).")
    epsilon_high: float | None = Field(_GRPO["epsilon_high"].default, description=_GRPO["epsilon_high"].help + ".")
    beta: float = Field(_GRPO["beta"].default, description=_GRPO["beta"].help + " (>= 0).")
    loss_agg: str = Field(_GRPO["loss_agg"].default, description=_GRPO["loss_agg"].help + ".")
    scale_rewards: Literal["group", "none"] = Field(
        "group", description="Advantages (r - group mean) divided by the group's reward std (group), or not (none: "
        "Dr. GRPO, arXiv 2503.20783).",
    )

    @model_validator(mode="before")
    @classmethod
    def _own_fields(cls, data):
        if isinstance(data, dict) and data.get("hparams"):
            raise ValueError(f"grpo's hyperparameters are keys of the section ({', '.join(_GRPO)}), not grpo.hparams")
        return data

    def loss_hparams(self) -> dict[str, float | str | None]:
        """The loss function's keyword arguments: the section's own keys of the same names."""
        return {name: getattr(self, name) for name in _GRPO}

    @property
    def uses_reference(self) -> bool:
        """Whether a step computes the reference's log-probs (beta > 0)."""
        return self.spec.uses_reference(self.loss_hparams())


class DistributedConfig(Strict):
    """Training on several devices: every training stage, and the no-grad log-prob passes inside them, run as
    ``processes × nodes`` ranks (tasks.launch, alignment.distributed). NCCL on CUDA, gloo on CPU."""

    strategy: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="none: one process (the default); ddp: a whole copy of the model per rank, gradients "
        "averaged; fsdp: FSDP2, parameters, gradients and optimizer state sharded per decoder layer (full fine-tuning "
        "of models one device cannot hold).",
    )
    processes: int = Field(1, ge=1, description="Ranks per node: one per GPU on a GPU node; CPU processes with gloo.")
    nodes: int = Field(1, ge=1, description="Nodes (several need launcher: ray).")
    launcher: Literal["torchrun", "ray"] = Field(
        "torchrun", description="torchrun: the ranks on this node; ray: Ray Train workers on the run's Ray cluster "
        "(orchestration.ray_address, RAY_ADDRESS, or the cluster of orchestration.runner: ray).",
    )
    timeout_s: float = Field(
        300.0, gt=0, description="A collective that waits longer than this (a rank died or hangs) fails the stage.",
    )

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes if self.strategy != "none" else 1

    @model_validator(mode="after")
    def _launchable(self) -> DistributedConfig:
        if self.nodes > 1 and self.launcher == "torchrun":
            raise ValueError(
                f"distributed.nodes is {self.nodes} with launcher torchrun, which starts the ranks of one node; "
                "set distributed.launcher: ray to train across nodes"
            )
        return self


# --- The trainer configs -------------------------------------------------------------------------


class TrainConfig(TrainSettings):
    """What ``alignment.training.train_loop`` trains with: one stage's settings, and the settings every stage
    takes from the rest of the recipe (seed, compute dtype, prompt format) or keeps at their defaults (AdamW's
    weight decay and clipping, LoRA's scale, dropout and modules). SFT trains with it as it is."""

    model_config = ConfigDict(frozen=True)

    seed: int = Field(0, description="Seeds the shuffles and any new weights (LoRA adapters, a reward model's head).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype: bfloat16 (CPU or GPU) or float16 (GPU) autocast over float32 weights.",
    )
    prompt: PromptFormat = Field(default_factory=PromptFormat, description="How prompts become tokens (alignment.prompting).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA adapters' input.")
    lora_target_modules: tuple[str, ...] = Field(
        (), description="Modules that get LoRA adapters; () = c_attn for GPT-2, every linear layer otherwise.",
    )
    strategy: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="Data parallelism across the ranks of a launch (distributed.strategy); none outside one.",
    )


class PreferenceConfig(TrainConfig):
    """Preference training (alignment.preference): a pairwise loss on pairs, a group loss on scored samples;
    ``batch_size`` counts pairs, or prompts (groups of samples) for a group loss."""

    objective: LossSettings = Field(
        default_factory=LossSettings, description="The loss and its hyperparameters, checked when they were built.",
    )
    ref_batch_size: int = Field(64, ge=1, description="Sequences per no-grad log-prob pass (reference, before, after).")

    @property
    def spec(self) -> _loss_table.LossSpec:
        return self.objective.spec


class RewardModelConfig(TrainConfig):
    """A Bradley–Terry reward model's training (alignment.reward_model): ``batch_size`` counts pairs. It trains
    every weight and reads prompts as it scores them (the tokenizer's own format), so ``prompt`` is unused."""

    @model_validator(mode="after")
    def _all_weights(self) -> RewardModelConfig:
        if self.lora_r:
            raise ValueError("lora_r: a reward model trains all its weights (its new score head too); set it to 0")
        return self


TrainStage = Literal["warm_start", "improve", "preference", "grpo"]


def trainer_config(recipe: Recipe, stage: TrainStage, seed: int) -> TrainConfig:
    """The trainer config of one training stage: the recipe's ``stage`` section, the settings every stage
    takes from the rest of the recipe (the compute dtype, the prompt format), and the stage's ``seed``
    (``Recipe.seed_for``). A loss section's ``LossSettings`` pass on as they were checked when it loaded."""
    section: TrainSettings = getattr(recipe, stage)
    settings = section.model_dump(include=set(TrainSettings.model_fields))
    shared = {"seed": seed, "dtype": recipe.model.dtype, "prompt": PromptFormat.of(recipe.prompt_format()),
              "strategy": recipe.distributed.strategy}
    if isinstance(section, LossSettings):
        return PreferenceConfig(**settings, **shared, objective=section)
    return TrainConfig(**settings, **shared)
