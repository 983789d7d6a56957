"""Evaluate a policy on the held-out prompts after every Improve step ("reward on D_eval")."""

from __future__ import annotations

from alignment.evaluation import score_heldout
from alignment.rewards import resolve_reward_spec, with_timeout
from alignment.samplers import make_sampler
from tasks.context import RunRef, figure, flywheel_task, log, progress_lines, retry_on_io, warn_truncated, where
from tasks.gpu import MODEL_LOAD_LOCK
from tasks.placement import run_once
from tasks.step_metrics import held_out_extras


@flywheel_task(name="evaluate", retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_on_io)
def evaluate(ref: RunRef, model_uri: str, iteration: int, step: int) -> dict[str, float]:
    """Greedy completions for every held-out prompt, committed as ``eval/step={i}``; returns the metrics."""
    lake, label = ref.open_lake(), where(iteration, step)
    uri = run_once(ref, ref.stage_uri(iteration, "eval", step), "evaluate", write_eval, model_uri, iteration, step, label=label)
    manifest = lake.manifest_doc(uri)
    metrics = {**manifest["metrics"], **manifest.get("seconds", {})}
    log().info("eval %s: reward %s, accuracy %.3f", ref.policy_version(model_uri), figure(metrics["eval_reward"]), metrics["eval_accuracy"])
    warn_truncated(f"eval {label}", metrics.get("eval_truncated"), "held-out completions", "eval.max_new_tokens",
                   ref.recipe.eval.max_new_tokens)
    return metrics


def write_eval(ref: RunRef, model_uri: str, iteration: int, step: int) -> str:
    """The body of ``evaluate`` (a GPU stage): sample greedily, score, commit the ``eval`` stage with its metrics."""
    recipe, lake, uri = ref.recipe, ref.open_lake(), ref.stage_uri(iteration, "eval", step)
    prompts = lake.read(ref.stage_uri(0, "eval_prompts")).sort("prompt_id")
    # Held-out completions come from the transformers sampler, with the same prompt format, stop rules
    # and precision as Grow (and Grow's options when Grow samples with transformers too).
    options = {"prompt": recipe.prompt_format(), "dtype": recipe.model.dtype, "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.grow.sampler == "transformers":
        options |= recipe.grow.sampler_options
    options["batch_size"] = recipe.eval.batch_size
    with MODEL_LOAD_LOCK:
        sampler = make_sampler("transformers", ref.local_model(model_uri), **options)
    with progress_lines():  # a large held-out set says how far its greedy pass and the KL pass are
        frame, metrics = score_heldout(
            sampler, prompts["prompt_id"].to_list(), prompts["prompt"].to_list(), prompts["reference"].to_list(),
            with_timeout(resolve_reward_spec(recipe.eval.reward or recipe.reward), recipe.reward_timeout_s),
            max_new_tokens=recipe.eval.max_new_tokens,
        )
        metrics |= held_out_extras(ref, sampler, frame, iteration)  # KL to the initial policy; the training reward
    # Timings are kept apart from the metrics: a re-run stage must reproduce its metrics exactly.
    seconds = {k: metrics.pop(k) for k in list(metrics) if k.startswith("seconds_")}
    lake.write_stage(uri, [frame], config={"eval": recipe.eval.model_dump()}, parents=[model_uri],
                     extra={"metrics": metrics, "seconds": seconds})
    return uri
