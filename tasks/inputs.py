"""The run's inputs as iteration 0 of the lake: prompts, held-out prompts, labelled data, base model.

The task's files are read and checked by ``alignment.task_files`` and the prompts measured against
the model's context by ``tasks.preflight`` before anything is written, so a file that cannot work
leaves no dataset behind.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alignment.recipe import Recipe
from alignment.task_files import load_task
from tasks.context import RunRef, flywheel_task, log, retry_on_io
from tasks.preflight import build_base, check_lengths, check_model_dir, texts_of


@flywheel_task(name="prepare-inputs", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=retry_on_io)
def prepare_inputs(ref: RunRef) -> dict[str, str]:
    """Write prompts, held-out prompts and labelled data to iteration 0, and the base model: their URIs.

    Every prompt is checked against the model's context (with room for ``max_new_tokens``) before
    anything is written, so a prompt file that cannot work leaves no dataset behind.
    """
    recipe: Recipe = ref.recipe
    lake = ref.open_lake()
    uris = {name: ref.stage_uri(0, name) for name in ("prompts", "eval_prompts", "labelled")}
    base_uri = ref.stage_uri(0, "base")
    if not all(lake.is_done(u) for u in uris.values()):
        data = load_task(recipe.task, recipe.seed_for("task"))
        with tempfile.TemporaryDirectory() as tmp:
            base_dir = recipe.model.path or build_base(recipe, texts_of([data.prompts, data.eval, data.labelled], recipe), tmp)
            check_lengths(recipe, base_dir, data)
            for name, frame in (("prompts", data.prompts), ("eval_prompts", data.eval), ("labelled", data.labelled)):
                lake.write_stage(uris[name], [frame], config=recipe.task.model_dump())
            if not recipe.model.path and not lake.is_done(base_uri):
                lake.put_dir(tmp, base_uri, extra={"kind": "base-model"})
        log().info("inputs: %d prompts, %d held-out, %d labelled", data.prompts.height, data.eval.height, data.labelled.height)
    uris["base"] = _base_model(ref, uris)
    return uris


def _base_model(ref: RunRef, uris: dict[str, str]) -> str:
    cfg = ref.recipe.model
    if cfg.path:
        check_model_dir(cfg.path)
        return str(Path(cfg.path).resolve())
    lake = ref.open_lake()
    uri = ref.stage_uri(0, "base")
    if not lake.is_done(uri):  # the inputs were committed by an attempt that stopped before the model
        frames = [lake.read(uris[name]) for name in ("prompts", "eval_prompts", "labelled")]
        with tempfile.TemporaryDirectory() as tmp:
            lake.put_dir(build_base(ref.recipe, texts_of(frames, ref.recipe), tmp), uri, extra={"kind": "base-model"})
    return uri
