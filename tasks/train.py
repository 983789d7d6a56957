"""Fine-tuning tasks: the behaviour-cloning warm start, ReST's Improve step (SFT), the preference losses of
iterative DPO and GRPO's steps.

Each writes its checkpoint to ``{lake}/models/{run}/iteration={g}/checkpoint/step={i}`` with a manifest, so a
resumed run reuses a finished checkpoint instead of training it again. A GRPO step's checkpoint lives only until
the next step's commits (``drop_superseded``); the iteration's last one is registered and kept.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl

from alignment import distributed
from alignment.metrics import own
from alignment.train_settings import trainer_config
from alignment.training import sft
from tasks.context import RunRef, flywheel_task, log, progress_lines
from tasks.placement import run_once


def _fit(ref: RunRef, start_uri: str, data_uri: str, out_uri: str, settings: str, seed: int) -> str:
    return run_once(ref, out_uri, "train", fit_sft, start_uri, data_uri, out_uri, settings, seed, label=ref.policy_version(out_uri))


def fit_sft(ref: RunRef, start_uri: str, data_uri: str, out_uri: str, settings: str, seed: int) -> str:
    """SFT of ``start_uri`` on ``data_uri`` into the checkpoint ``out_uri``, with the recipe's ``settings``
    section (``warm_start`` or ``improve``): a GPU stage, which may run in its own process or on a GPU worker."""
    lake, cfg = ref.open_lake(), trainer_config(ref.recipe, settings, seed)
    data = lake.read(data_uri)
    Path(ref.cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ref.cache_dir) as tmp, progress_lines():
        # A truncated sample reaches training only when filter.keep_truncated asks: then without an end token.
        finished = (data["finish_reason"] != "length").to_list() if "finish_reason" in data.columns else None
        metrics = sft(
            ref.local_model(start_uri), tmp, data["prompt"].to_list(), data["completion"].to_list(),
            cfg, finished=finished, trust_remote_code=ref.recipe.model.trust_remote_code,
        )
        _commit(ref, tmp, out_uri, cfg.strategy, {"kind": "checkpoint", "start": start_uri, "data": data_uri, "metrics": metrics})
    log().info("trained %s on %d examples: loss %.4f", ref.policy_version(out_uri), data.height, metrics["train_loss"])
    return out_uri


def _commit(ref: RunRef, folder: str, out_uri: str, strategy: str, extra: dict) -> None:
    """Commit a trained checkpoint with how it was trained (world size, each rank's peak memory): from rank 0
    only when the stage runs as several ranks (every rank calls this; it gathers the records)."""
    extra["metrics"] |= distributed.records(strategy)
    extra["distributed"] = {"strategy": strategy, "world_size": int(extra["metrics"]["world_size"])}
    if distributed.world(strategy).main:
        ref.open_lake().put_dir(folder, out_uri, extra=extra, cache_root=Path(ref.cache_dir) / "models")


@flywheel_task(name="warm-start")
def warm_start(ref: RunRef, base_uri: str) -> str:
    """Algorithm 1's "Train pi_theta on D": behaviour cloning on the labelled data."""
    return _fit(ref, base_uri, ref.stage_uri(0, "labelled"), ref.stage_uri(0, "checkpoint", 0), "warm_start", ref.recipe.seed_for("warm_start"))


@flywheel_task(name="improve")
def improve(ref: RunRef, start_uri: str, filtered_uri: str, iteration: int, step: int) -> str:
    """One Improve step: fine-tune ``start_uri`` on the filtered data, prompt tokens masked."""
    seed = ref.recipe.seed_for("improve", iteration, step)
    return _fit(ref, start_uri, filtered_uri, ref.stage_uri(iteration, "checkpoint", step), "improve", seed)


def train_metrics(ref: RunRef, model_uri: str) -> dict[str, float]:
    """The training metrics recorded in a checkpoint's manifest."""
    raw = ref.open_lake().manifest_doc(model_uri)
    return raw.get("metrics", {})


@flywheel_task(name="train-preference")
def train_preference(ref: RunRef, start_uri: str, pairs_uri: str, scored_uri: str, iteration: int) -> str | None:
    """One iterative-DPO training step with the recipe's preference loss, on the table the loss trains on
    (the pairs, or a group loss's scored samples); None when that table is empty and nothing is trained."""
    data_uri = pairs_uri if ref.recipe.preference.spec.trains_on == "pairs" else scored_uri
    if ref.open_lake().manifest(data_uri).rows == 0:
        return None
    out_uri = ref.stage_uri(iteration, "checkpoint", 1)
    return run_once(ref, out_uri, "train", fit_preference, start_uri, pairs_uri, scored_uri, iteration, out_uri,
                    label=ref.policy_version(out_uri))


def fit_preference(ref: RunRef, start_uri: str, pairs_uri: str, scored_uri: str, iteration: int, out_uri: str) -> str:
    """The body of ``train_preference`` (a GPU stage; may run in its own process or on a GPU worker)."""
    from alignment.preference import fit

    lake = ref.open_lake()
    cfg = trainer_config(ref.recipe, "preference", ref.recipe.seed_for("preference", iteration))
    if cfg.spec.trains_on == "pairs":
        data_uri, data = pairs_uri, lake.read(pairs_uri)
    else:  # the policy's own scored samples, grouped by prompt (demonstrations carry no reward)
        data_uri, data = scored_uri, own(lake.read(scored_uri))
    Path(ref.cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ref.cache_dir) as tmp, progress_lines():
        metrics = fit(ref.local_model(start_uri), tmp, data, cfg, trust_remote_code=ref.recipe.model.trust_remote_code)
        _commit(ref, tmp, out_uri, cfg.strategy, {"kind": "checkpoint", "start": start_uri, "data": data_uri, "metrics": metrics})
    log().info("trained %s with %s on %d rows: loss %.4f", ref.policy_version(out_uri), cfg.spec.name, data.height, metrics["train_loss"])
    return out_uri


@flywheel_task(name="train-grpo")
def train_grpo(ref: RunRef, start_uri: str, groups_uri: str, iteration: int, step: int) -> str:
    """GRPO step ``step`` of ``iteration``: μ epochs of updates of ``start_uri`` (π_old, which sampled the groups)
    on the step's ``groups``, into ``checkpoint/step={step}``; the per-update figures go to ``updates/step={step}``."""
    out_uri = ref.stage_uri(iteration, "checkpoint", step)
    return run_once(ref, out_uri, "train", fit_grpo, start_uri, groups_uri, iteration, step, out_uri,
                    label=ref.policy_version(out_uri))


def fit_grpo(ref: RunRef, start_uri: str, groups_uri: str, iteration: int, step: int, out_uri: str) -> str:
    """The body of ``train_grpo`` (a GPU stage; may run as several ranks, in its own process or on a GPU worker)."""
    from alignment.grpo import train_grpo as fit

    lake = ref.open_lake()
    cfg = trainer_config(ref.recipe, "grpo", ref.recipe.seed_for("grpo", iteration, step))
    data = lake.read(groups_uri)
    Path(ref.cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ref.cache_dir) as tmp, progress_lines():
        metrics, updates = fit(ref.local_model(start_uri), tmp, data, cfg, trust_remote_code=ref.recipe.model.trust_remote_code)
        if distributed.world(cfg.strategy).main:  # committed before the checkpoint that marks the step done
            lake.write_stage(ref.stage_uri(iteration, "updates", step), [pl.DataFrame(updates)],
                             config={"grpo": ref.recipe.grpo.model_dump()}, parents=[groups_uri, start_uri])
        _commit(ref, tmp, out_uri, cfg.strategy, {"kind": "checkpoint", "start": start_uri, "data": groups_uri, "metrics": metrics})
    log().info("trained %s with grpo on %d samples: %d updates, loss %.4f, kl %s", ref.policy_version(out_uri), data.height,
               len(updates), metrics["train_loss"], f"{metrics['kl']:.4f}" if "kl" in metrics else "-")
    return out_uri


def drop_superseded(ref: RunRef, iteration: int, step: int) -> None:
    """Delete the checkpoints of ``iteration``'s GRPO steps before ``step``, whose checkpoint has committed: each was
    needed only to sample, score and train the next step, so the lake keeps one model per iteration, not per step."""
    lake = ref.open_lake()
    for earlier in range(1, step):
        lake.clear(ref.stage_uri(iteration, "checkpoint", earlier))


def grpo_figures(ref: RunRef, groups_uri: str, updates_uri: str) -> dict[str, float]:
    """A GRPO step's diagnostics from the lake: its samples' (the groups stage's manifest) and its updates' means."""
    from alignment.grpo import update_figures

    lake = ref.open_lake()
    out = {k: float(v) for k, v in lake.manifest_doc(groups_uri).get("figures", {}).items() if v is not None}
    return out | (update_figures(lake.read(updates_uri)) if lake.is_done(updates_uri) else {})


def last_checkpoint(ref: RunRef, iteration: int, steps: int) -> int:
    """The latest GRPO step of ``iteration`` whose checkpoint is committed (0: none): a resumed iteration trains
    from it, and the steps before it, whose checkpoints were dropped, are not trained again."""
    lake = ref.open_lake()
    return max((i for i in range(1, steps + 1) if lake.is_done(ref.stage_uri(iteration, "checkpoint", i))), default=0)
