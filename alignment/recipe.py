"""Recipes: the typed, loud configuration of a flywheel run.

A recipe is YAML validated by these pydantic models. Every model forbids unknown keys (a typo is
an error naming the key), every field has a description (Prefect renders them as the UI form),
and ``--set dotted.key=value`` overrides are parsed as YAML scalars and validated the same way.
How each fine-tuning stage trains (``warm_start``, ``improve``, ``preference``, ``grpo``) is in
alignment/train_settings.py; where a run keeps its records and how it is orchestrated (``mlflow``,
``s3``, ``orchestration``) in alignment/run_settings.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from alignment.errors import UserError
from alignment.run_settings import MlflowConfig, OrchestrationConfig, S3Config, Stage  # noqa: F401  (re-exported)
from alignment.strict import Strict
from alignment.train_settings import DistributedConfig, GRPOSettings, ImproveConfig, PreferenceSettings, WarmStart


class TaskConfig(Strict):
    """Where prompts, references and labelled warm-start data come from."""

    builtin: Literal["arithmetic", "wordmath"] | None = Field(
        "arithmetic", description="A built-in task (arithmetic: '37+5=' sums; wordmath: GSM8K-style word problems); "
        "set to null and give `prompts` to bring your own.",
    )
    prompts: str | None = Field(None, description="JSONL or Parquet file of training prompts (with references).")
    eval: str | None = Field(None, description="JSONL or Parquet file of held-out prompts with references.")
    labelled: str | None = Field(
        None, description="JSONL or Parquet file of labelled (prompt, completion) pairs for the warm start."
    )
    prompt_column: str = Field("prompt", description="Column holding the prompt text.")
    reference_column: str = Field("reference", description="Column holding the reference answer.")
    completion_column: str = Field("completion", description="Column holding the labelled completion.")
    n_labelled: int = Field(200, ge=1, description="Built-in task: labelled examples for the warm start.")
    n_prompts: int = Field(600, ge=1, description="Built-in task: prompts to grow from.")
    n_eval: int = Field(200, ge=1, description="Built-in task: held-out prompts.")
    labelled_reference_column: str | None = Field(
        None, description="Column of the labelled file holding a reference answer for the reward; null = the labelled "
        "rows are demonstrations, kept without being scored.",
    )

    @model_validator(mode="after")
    def _source(self) -> TaskConfig:
        if self.builtin is None and not (self.prompts and self.eval):
            raise ValueError("task needs either `builtin` or both `prompts` and `eval` files")
        return self


class ModelConfig(Strict):
    """The initial policy: the built-in tiny model, or a local Hugging Face model directory."""

    path: str | None = Field(None, description="Local model directory; null builds the tiny model from the data.")
    trust_remote_code: bool = Field(False, description="Allow custom model code from `path` to run.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision for sampling, and the autocast dtype of training over float32 weights "
        "(float16 needs a GPU).",
    )
    max_length: int | None = Field(
        None, ge=2, description="Longest prompt + completion in tokens; null = the model's context window.",
    )
    arch: Literal["llama", "gpt2"] = Field("llama", description="Tiny model: architecture.")
    tokenizer: Literal["char", "bpe"] = Field(
        "char", description="Tiny model: one token per character, or byte-level BPE trained on the task (ChatML).",
    )
    vocab_size: int = Field(512, ge=300, description="Tiny model with a BPE tokenizer: vocabulary size.")
    n_layer: int = Field(2, ge=1, description="Tiny model: transformer layers.")
    n_embd: int = Field(96, ge=8, description="Tiny model: hidden width.")
    n_head: int = Field(4, ge=1, description="Tiny model: attention heads.")
    n_positions: int = Field(64, ge=8, description="Tiny model: context window in tokens.")


class PromptConfig(Strict):
    """How prompts are shown to the model (alignment.prompting), the same on every path."""

    format: Literal["auto", "chat", "raw"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one, else raw; chat: always the template; "
        "raw: the prompt text as is.",
    )
    system: str | None = Field(None, description="A system message placed before every prompt (chat format).")
    stop: list[str] = Field(
        default_factory=list, description="Stop strings: a completion ends at the first one (it is not kept in the text).",
    )

    @model_validator(mode="after")
    def _stops(self) -> PromptConfig:
        if any(not s for s in self.stop):
            raise ValueError("prompt.stop strings must not be empty")
        return self


SECRET_KEYS = frozenset({"api_key", "token", "password", "secret", "access_key", "secret_access_key"})


class GrowConfig(Strict):
    """Grow: sample N completions per prompt from the current policy."""

    samples_per_prompt: int = Field(8, ge=1, description="N, completions sampled per prompt.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(8, ge=1, description="Longest completion, in tokens.")
    batch_size: int = Field(256, ge=1, description="Sequences generated per forward batch.")
    sampler: Literal["transformers", "vllm", "openai"] = Field("transformers", description="Sampling backend.")
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="Backend options (e.g. tensor_parallel_size, base_url)."
    )
    include_labelled: bool = Field(
        True, description="Add the labelled data D to every grown dataset (D_g = samples ∪ D, Algorithm 1)."
    )
    shards: int = Field(1, ge=1, description="Split prompts into this many shards, sampled as separate tasks.")

    @model_validator(mode="after")
    def _no_secrets(self) -> GrowConfig:
        secret = sorted(k for k in self.sampler_options if k.lower() in SECRET_KEYS)
        if secret:
            raise ValueError(
                f"grow.sampler_options.{secret[0]} would store a secret in the recipe, the lake, MLflow and Prefect; "
                "put it in the environment (OPENAI_API_KEY) or name the variable with grow.sampler_options.api_key_env"
            )
        return self


class FilterConfig(Strict):
    """Improve's filter F(x, y; tau): which scored samples are trained on."""

    kind: Literal["rest", "fixed", "quantile", "top_k"] = Field(
        "rest", description="rest: tau_1 above the mean reward, rising each Improve step; or fixed/quantile/top_k."
    )
    threshold: float | None = Field(None, description="fixed: keep reward >= threshold.")
    quantile: float | None = Field(None, ge=0, le=1, description="quantile: keep reward >= this quantile.")
    k: int | None = Field(None, ge=1, description="top_k: keep the k best completions per prompt.")
    dedupe: bool = Field(True, description="Drop identical completions of one prompt before filtering.")
    keep_truncated: bool = Field(
        False, description="Keep samples cut off by max_new_tokens (trained without an end token); by default they "
        "are dropped with the reason 'truncated'.",
    )

    @model_validator(mode="after")
    def _needs(self) -> FilterConfig:
        need = {"fixed": "threshold", "quantile": "quantile", "top_k": "k"}.get(self.kind)
        if need and getattr(self, need) is None:
            raise ValueError(f"filter.kind={self.kind!r} needs filter.{need}")
        return self


RewardSpec = str | list[Any] | dict[str, Any]
SeedStream = Literal["task", "base", "warm_start", "grow", "improve", "preference", "pair", "grpo"]
Algorithm = Literal["rest", "iterative_dpo", "grpo"]
# The section each loop trains with; a loop's own section set on another loop's recipe would be ignored.
LOOP_SECTIONS: dict[str, str] = {"rest": "improve", "iterative_dpo": "preference", "grpo": "grpo"}
OWN_SECTIONS = ("grpo",)


class EvalConfig(Strict):
    """Held-out evaluation after every Improve step (greedy decoding)."""

    reward: RewardSpec | None = Field(
        None, description="Held-out reward; null uses the recipe's reward. Accuracy is the share of prompts whose "
        "held-out reward is at least 1.",
    )
    max_new_tokens: int = Field(8, ge=1, description="Longest greedy completion, in tokens.")
    batch_size: int = Field(256, ge=1, description="Prompts per generation batch.")
    patience: int = Field(
        1, ge=1, description="Stop after this many Improve steps without a better held-out reward."
    )


class PromotionConfig(Strict):
    """The champion gate: every check must pass for the ``champion`` alias to move (alignment.metrics.promotion_checks).

    Each check is logged with its value, limit and verdict (MLflow version tags ``flywheel.promotion.<check>``,
    ``summary.json``); a null limit turns a check off.
    """

    min_improvement: float = Field(
        0.0, description="Held-out reward must beat the champion's by more than this (with eval.reward set, the "
        "verifier's reward: the verifier must improve).",
    )
    max_length_drift: float | None = Field(
        None, ge=0, description="Largest relative change of the mean held-out completion length vs the baseline "
        "(0.5 = 50%); null = off.",
    )
    max_kl: float | None = Field(
        None, ge=0, description="Largest per-token KL(policy || initial policy) on held-out prompts (k1 estimate on "
        "greedy completions); null = off.",
    )
    max_reward_gap_widening: float | None = Field(
        None, description="When eval.reward (the verifier) differs from the training reward: the largest rise of "
        "(training reward - verifier reward) on held-out completions vs the baseline's; null = off.",
    )


class Recipe(Strict):
    """A flywheel run: task, model, loop and where its data and models go."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Recipe name (default model name).")
    algorithm: Algorithm = Field("rest", description="Which loop to run: ReST, iterative DPO or GRPO.")
    seed: int = Field(0, description="Seed for data splits, model init, sampling and training.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Prompts, references and labelled data.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The initial policy.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Prompt format and stop strings.")
    reward: RewardSpec = Field(
        "exact_match",
        description="Built-in reward name, 'package.module:function', 'rm:PATH' (a reward model), "
        "or an ensemble {ensemble: [spec, ...], reduce: min|mean}.",
    )
    reward_timeout_s: float = Field(
        600.0, gt=0, description="Seconds one call of the reward may take before the run stops with an error naming it "
        "(the call's thread is abandoned, not killed).",
    )
    warm_start: WarmStart = Field(
        default_factory=lambda: WarmStart(epochs=30, lr=3e-3, batch_size=16),
        description="Behaviour cloning before the first Grow step.",
    )
    grow: GrowConfig = Field(default_factory=GrowConfig, description="Grow step settings.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Improve step filter.")
    improve: ImproveConfig = Field(default_factory=ImproveConfig, description="Improve step fine-tuning.")
    preference: PreferenceSettings = Field(
        default_factory=lambda: PreferenceSettings(epochs=2, lr=5e-4, batch_size=16),
        description="Iterative DPO: pairing and preference loss.",
    )
    grpo: GRPOSettings = Field(
        default_factory=lambda: GRPOSettings(epochs=1, lr=1e-3, batch_size=16),
        description="GRPO: steps per iteration, prompts per step, the clipped objective and its reference.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Training on several devices (every training stage).",
    )
    grow_steps: int = Field(3, ge=0, description="G, Grow steps (iterations; T for iterative DPO); 0 = warm start only.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig, description="Checks that must all pass for a new version to become the champion."
    )
    lake: str = Field("file://./lake", description="Where datasets and checkpoints go: file://PATH or s3://BUCKET/PREFIX.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint settings for an s3:// lake.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="Tracking and registry.")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="Task runner, schedule and work pools."
    )

    @field_validator("lake")
    @classmethod
    def _lake_scheme(cls, lake: str) -> str:
        scheme = lake.partition("://")[0] if "://" in lake else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(f"use file://PATH or s3://BUCKET/PREFIX; {scheme}:// is not supported")
        return lake

    @model_validator(mode="after")
    def _loop_settings(self) -> Recipe:
        loop = getattr(self, LOOP_SECTIONS[self.algorithm])
        for section in OWN_SECTIONS:
            if getattr(self, section) is not loop and getattr(self, section) != Recipe.model_fields[section].default_factory():
                raise ValueError(f"{section}.* keys apply to algorithm: {section}, and this recipe runs {self.algorithm}; "
                                 f"remove them or set algorithm: {section}")
        if isinstance(loop, GRPOSettings):
            if self.grow.samples_per_prompt < 2:
                raise ValueError(f"grow.samples_per_prompt is {self.grow.samples_per_prompt}, and GRPO compares each "
                                 "sample with the others of its group: set it to 2 or more (G, e.g. 8)")
            if self.grow.include_labelled:
                raise ValueError("grow.include_labelled adds the labelled demonstrations to the samples, which GRPO does not "
                                 "train on (they are not the policy's): set grow.include_labelled: false")
        return self

    @property
    def model_name(self) -> str:
        return self.mlflow.model_name or self.name

    def prompt_format(self) -> dict[str, Any]:
        """The prompt settings every path tokenises with (``alignment.prompting.PromptFormat``)."""
        return {**self.prompt.model_dump(), "max_length": self.model.max_length}

    def seed_for(self, stream: SeedStream, iteration: int = 0, step: int = 0) -> int:
        """The seed of one random stream of the run, derived from the recipe's ``seed``: the only place
        a seed is made, so two stages never share a stream by accident.

        ``task`` (prompt splits), ``base`` (the built-in model's init) and ``warm_start`` use ``seed``
        itself; ``grow`` (Grow step g's samples), ``improve`` (step i of Grow step g) and
        ``preference`` (iteration t's training shuffles) sit in ``seed * 1000 + ...``, one seed per
        iteration (and per Improve step, up to nine a Grow step); ``pair`` (which sample a random
        pairing draws) is ``seed + t``; ``grpo`` (step i of iteration g: its batch of prompts, its
        samples and the order of its updates) is ``(seed * 1000 + g) * 1000 + i``.
        These are the formulas the first runs used: a seeded run keeps writing the data it always has.
        """
        s = self.seed
        return {
            "task": s, "base": s, "warm_start": s,
            "grow": s * 1000 + iteration,
            "improve": s * 1000 + iteration * 10 + step,
            "preference": s * 1000 + iteration,
            "pair": s + iteration,
            "grpo": (s * 1000 + iteration) * 1000 + step,
        }[stream]


class RecipeError(UserError):
    """A recipe file or override is wrong; the message says which key and how to fix it."""


def _format(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "recipe"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ").rstrip(".")
            parts.append(f"{key}: {msg}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""))
    return "; ".join(parts)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML scalars (``3``, ``true``, ``null``), and
    a value that is not YAML (``* * * * *``: ``*`` is a YAML alias) is the text itself, for the key's type check."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"Override {item!r} is not of the form dotted.key=value.")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"Override {item!r}: {p!r} is not a section.")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply overrides, validate; errors are one sentence naming the key."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"Recipe file {path} does not exist; pass the path to a YAML recipe such as recipes/arithmetic-rest.yaml.")
    if path.is_dir():
        raise RecipeError(f"Recipe {path} is a folder; pass a YAML recipe file in it, such as {path / '*.yaml'}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"Recipe {path} is not valid YAML: {' '.join(str(exc).split())}.") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe {path} must be a YAML mapping of keys to values.")
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"Recipe {path} is invalid: {_format(exc)}.") from exc
