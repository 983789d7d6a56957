"""The figures of one Improve step beyond held-out reward (alignment.metrics), and how long each stage took.

- ``held_out_extras`` runs inside the evaluation stage, where the candidate is loaded: the per-token
  KL to the initial policy on the held-out completions (``eval_kl``) and, when ``eval.reward`` is a
  separate verifier, the training reward on the same completions (``eval_train_reward``). The
  candidate's log-probs come with its greedy completions, so the KL costs one pass of the initial
  policy over them.
- ``step_metrics`` reads the step's committed stages and returns reward spread, kept fraction, prompt
  coverage, pass@k, lengths, win rate against the champion, Grow throughput and the seconds per stage,
  for ``register(step_metrics=...)`` and ``summary.step(..., **extra)``. It is a plain function the flow
  calls, not a task: it only reads what the step's tasks committed (a few small tables, already in the
  run's cache), which costs less than a task run's bookkeeping would.
- ``Stopwatch`` times the stage calls in the flows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import polars as pl

from alignment import metrics as m
from tasks.context import RunRef, log

T = TypeVar("T")
SMALL_MODEL_PARAMS = 50_000_000
_REFERENCE: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # the KL's reference model, when small


class Stopwatch:
    """``clock("grow", grow, ref, policy, g)`` calls ``grow(ref, policy, g)`` and keeps its seconds as ``seconds_grow``.

    A Grow step's grow and score seconds stay in ``seconds`` for each of its Improve steps.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[f"seconds_{stage}"] = time.perf_counter() - start


def verifier_differs(recipe) -> bool:
    """Whether held-out evaluation uses its own reward (a verifier) rather than the training reward."""
    return recipe.eval.reward is not None and recipe.eval.reward != recipe.reward


def held_out_extras(ref: RunRef, sampler, frame, iteration: int) -> dict[str, float]:
    """``eval_kl``, ``eval_train_reward`` (with a separate verifier) and the seconds they took (``seconds_eval_extras``).

    The reference of the KL is the policy the run started from (the checkpoint evaluated as the
    baseline), so the figure is the drift of the whole run; the baseline's own KL is 0.
    """
    from alignment.rewards import resolve_reward_spec
    from alignment.rewards import score, with_timeout

    start, recipe, out = time.perf_counter(), ref.recipe, {}
    prompts, completions = frame["prompt"].to_list(), frame["completion"].to_list()
    out["eval_kl"] = 0.0 if iteration == 0 else _kl(ref, sampler, frame)
    if verifier_differs(recipe):
        reward = with_timeout(resolve_reward_spec(recipe.reward), recipe.reward_timeout_s)
        train = score(reward, prompts, completions, frame["reference"].to_list())
        out["eval_train_reward"] = sum(train) / max(1, len(train))
    out["seconds_eval_extras"] = time.perf_counter() - start
    return out


def _kl(ref: RunRef, sampler, frame) -> float:
    """k1 per token on the candidate's greedy completions: its log-probs from generation (``token_logps``),
    the initial policy's from one teacher-forced pass over the same ids."""
    from alignment.evaluation import completion_logps
    from alignment.models import load_policy
    from tasks.gpu import MODEL_LOAD_LOCK

    recipe, lake, dtype = ref.recipe, ref.open_lake(), ref.recipe.model.dtype
    reference_uri = lake.manifest(ref.stage_uri(0, "eval", 0)).parents[0]  # the baseline's eval stage names its model
    key = (ref.local_model(reference_uri), str(sampler.model.device), dtype)
    with MODEL_LOAD_LOCK:
        model, tokenizer = _REFERENCE.get(key) or load_policy(key[0], trust_remote_code=recipe.model.trust_remote_code,
                                                              device=key[1], dtype=dtype)
        # Keep a small reference loaded for the next evaluation (loading the demo's takes longer than its
        # pass); a large one is freed, so it never holds memory that training needs.
        _REFERENCE.clear()
        if sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMS:
            _REFERENCE[key] = (model, tokenizer)
    ids = frame["token_ids"].to_list()
    ref_logp = completion_logps(model, frame["prompt_token_ids"].to_list(), ids, pad_id=sampler.formatter.pad_id,
                                batch_size=recipe.eval.batch_size, dtype=dtype)
    rows = pl.DataFrame({"logp": frame["token_logps"].cast(pl.List(pl.Float64)).list.sum(), "ref_logp": ref_logp,
                         "tokens": [len(t) for t in ids]})
    return m.kl_per_token(rows) or 0.0


def step_metrics(
    ref: RunRef,
    scored_uri: str,
    kept_uri: str | None,
    eval_uri: str,
    champion_eval_uri: str | None,
    seconds: dict[str, float],
) -> dict[str, float]:
    """The step's figures (alignment.metrics.step_metrics), duplicates dropped, Grow throughput and stage
    seconds; figures that do not exist (no kept rows, no champion) are left out.

    ``kept_uri`` is a ``filtered`` stage (ReST) or a ``pairs`` stage, whose kept samples are the scored
    rows its step's ``decisions`` mark kept (those a pair uses)."""
    start, lake = time.perf_counter(), ref.open_lake()
    scored = lake.read(scored_uri)
    where = lake.address(kept_uri) if kept_uri else None
    kept = lake.read(kept_uri) if where is not None and where.stage != "pairs" else None
    if where is not None and where.stage == "pairs":
        fates = lake.read(lake.stage_uri(where.run, where.iteration, "decisions", 1)).filter(pl.col("decision") == "kept")
        kept = scored.join(fates.select("prompt_id", "sample_idx"), on=["prompt_id", "sample_idx"], how="semi")
    champion = lake.read(champion_eval_uri) if champion_eval_uri else None
    out: dict[str, float | None] = m.step_metrics(scored, kept, lake.read(eval_uri), champion)
    if kept_uri:
        out["duplicates_dropped"] = lake.manifest_doc(kept_uri).get("dropped", {}).get("duplicate")
    out |= m.throughput(scored, seconds.get("seconds_grow", 0.0))
    out |= {k: v for k, v in seconds.items() if k != "seconds_register"}  # register's are logged once it has run
    out["seconds_metrics"] = time.perf_counter() - start
    log().info("metrics: kept fraction %s, win rate %s, pass@1 %s", _fmt(out.get("kept_fraction")), _fmt(out["win_rate"]),
               _fmt(out["pass_at_1"]))
    return {k: float(v) for k, v in out.items() if v is not None}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
