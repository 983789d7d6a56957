"""``flywheel-stage``: one stage of a run, as its own flow run on the work pool its deployment names.

The ReST and iterative-DPO flows send a stage here when ``orchestration.stage_deployments`` names a
deployment of this flow for it (tasks/placement.py). infra/prefect.yaml deploys it twice::

    flywheel-stage/gpu   on flywheel-gpu   Grow shards, training, evaluation, the reference pass
    flywheel-stage/cpu   on flywheel-cpu   scoring and filtering

The run executes one registered stage body with the calling run's ``RunRef`` (models and data are
read from and written to the lake, so the worker needs the lake and nothing else), holds its host's
GPU slot for a GPU stage, and leaves the return value in the lake for the caller. Only the bodies
listed in ``STAGE_FUNCTIONS`` can be run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from alignment.recipe import Stage
from tasks.context import RunRef, local_cache_dir
from tasks.evaluate import write_eval
from tasks.filter import compute_thresholds, write_filtered, write_groups
from tasks.grow import sample_shard
from tasks.pair import write_pairs
from tasks.placement import function_name, result_uri, run_here
from tasks.score import score_part
from tasks.train import fit_grpo, fit_preference, fit_sft

STAGE_FUNCTIONS = {
    function_name(fn): fn
    for fn in (sample_shard, score_part, compute_thresholds, write_filtered, write_pairs, write_groups, fit_sft, fit_preference,
               fit_grpo, write_eval)
}


@flow(name="flywheel-stage", log_prints=True, validate_parameters=True)
def stage(stage: Stage, function: str, ref: RunRef, args: list[Any]) -> Any:
    """Run one stage of a flywheel run on this worker and leave its result in the lake.

    Args:
        stage: Which stage this is (grow, score, filter, pair, train, evaluate); GPU stages take a GPU slot.
        function: The stage body, as module:function (one of flows.stage.STAGE_FUNCTIONS).
        ref: The calling run: its name, lake, recipe and MLflow run.
        args: The body's arguments after ``ref``.
    """
    from prefect.runtime import flow_run

    try:
        fn = STAGE_FUNCTIONS[function]
    except KeyError:
        raise ValueError(f"{function!r} is not a flywheel stage; expected one of {sorted(STAGE_FUNCTIONS)}.") from None
    # The caller's cache directory is a path on its machine; models are cached on this one.
    ref = ref.model_copy(update={"cache_dir": local_cache_dir()})
    result = run_here(ref, stage, fn, *args)
    ref.open_lake().put_json(result_uri(ref, flow_run.id), {"result": result})
    return result
