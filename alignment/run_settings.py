"""Where a run keeps its records and how it is orchestrated: the recipe's ``mlflow``, ``s3`` and
``orchestration`` sections (alignment/recipe.py holds the experiment itself).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignment.strict import Strict

class MlflowConfig(Strict):
    """Tracking and the model registry."""

    tracking_uri: str = Field("sqlite:///mlflow/mlflow.db", description="MLflow tracking URI.")
    experiment: str = Field("flywheel", description="MLflow experiment name.")
    model_name: str | None = Field(None, description="Registered model name; defaults to the recipe name.")
    artifact_location: str | None = Field(
        None, description="Where a new experiment keeps artifacts (e.g. s3://bucket/mlflow); null = beside the SQLite db."
    )


class S3Config(Strict):
    """S3 endpoint settings; credentials always come from the standard AWS settings, never the recipe."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (e.g. http://127.0.0.1:8333); null = AWS default.")
    region: str | None = Field(None, description="S3 region; null = AWS default.")


Stage = Literal["grow", "score", "filter", "pair", "train", "evaluate"]


class OrchestrationConfig(Strict):
    """How the run is orchestrated beyond one process: task runner, stage placement, schedule, GPU admission.

    Every stage runs in the flow run's own process unless ``stage_deployments`` sends it to a
    deployment of the ``flywheel-stage`` flow, whose work pool decides the machine (infra/prefect.yaml:
    Grow, training and evaluation on ``flywheel-gpu``, scoring and filtering on ``flywheel-cpu``).
    """

    runner: Literal["thread", "ray"] = Field("thread", description="Task runner for Grow shards and scoring.")
    ray_address: str | None = Field(None, description="Ray cluster address (e.g. ray://head:10001); null starts a local one.")
    ray_gpus_per_stage: float = Field(
        0.0, ge=0, description="With runner ray: GPUs a Grow shard or training stage asks Ray for (1 = a whole GPU; "
        "0 = none, the CPU demo).",
    )
    schedule: str | None = Field(None, description="Cron schedule for `flywheel serve` (e.g. '0 3 * * *'); null = none.")
    stage_deployments: dict[Stage, str] = Field(
        default_factory=dict,
        description="Stage -> deployment ('flywheel-stage/gpu') that runs it as its own flow run on that deployment's "
        "work pool; a stage not listed runs in the flow's process. Stages: grow, score, filter, pair, train, evaluate.",
    )
    stage_timeout_s: float | None = Field(
        None, gt=0, description="A stage sent to a deployment that has not finished after this many seconds is "
        "cancelled and fails (then its task's retries apply); null waits as long as it takes.",
    )
    score_on_gpu: bool = Field(False, description="Treat scoring as a GPU stage (reward models): it takes a GPU slot.")
    gpu_concurrency_limit: str = Field("gpu", description="Global concurrency limit that holds one GPU job per GPU.")
    isolate_gpu_stages: bool = Field(
        False, description="Run Grow, training and evaluation in their own process so GPU memory is freed between stages."
    )

    @model_validator(mode="after")
    def _deployment_names(self) -> OrchestrationConfig:
        for stage, name in self.stage_deployments.items():
            flow_name, _, deployment = name.partition("/")
            if not flow_name or not deployment or "/" in deployment:
                raise ValueError(
                    f"orchestration.stage_deployments.{stage} is {name!r}; name a deployment as "
                    "'FLOW/DEPLOYMENT', e.g. 'flywheel-stage/gpu'"
                )
        return self
