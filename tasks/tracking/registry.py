"""MLflow: one parent run per flywheel run, a nested run per iteration, a model version per Improve
step, dataset lineage, and the ``champion`` alias, moved only when held-out reward beats it.

Every call is idempotent, so a resumed run finds its parent run, nested runs and model versions
by their tags instead of creating them twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from alignment.metrics import blocked_by, promotion_checks
from tasks.context import RunRef, flywheel_task, log, retry_on_io
from tasks.lake import flatten
from tasks.results import Registration
from tasks.tracking.probe import check_tracking

CHAMPION = "champion"
PROMOTED_TAG = "flywheel.promoted"  # set once the champion decision for a version is made
PROMOTION_TAG = "flywheel.promotion."  # + check name: {"value", "limit", "passed"} as JSON
ERROR_TAG = "flywheel.error"  # why a run ended FAILED or KILLED
MLFLOW_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15], "retry_condition_fn": retry_on_io}
# MLflow's HTTP client waits 120 s per request and retries 7 times with backoff: a stopped server
# would hang a run for minutes. These bound one request; the task retries above cover blips.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
# The served pyfunc's inputs, outputs and inference params (``predict(..., params={...})``).
SIGNATURE_EXAMPLE = (["12+7="], ["19"], {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 0})


def configure(ref: RunRef) -> str:
    """Point MLflow at the recipe's tracking URI and return the experiment id (created if needed).

    With ``mlflow.artifact_location: s3://...`` MLflow's own S3 client stores the artifacts; it reads
    its endpoint from ``MLFLOW_S3_ENDPOINT_URL`` (else boto3's ``AWS_ENDPOINT_URL``), so the recipe's
    ``s3.endpoint_url`` is handed to it here, at call time. Credentials stay in the AWS settings.
    A tracking server that does not answer fails here as one ``TrackingUnreachable`` sentence.
    """
    cfg = ref.recipe.mlflow
    if ref.recipe.s3.endpoint_url:
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = ref.recipe.s3.endpoint_url
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = Path(uri[len("sqlite:///") :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{db}"
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.artifact_location
    if location is None and uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return mlflow.create_experiment(cfg.experiment, artifact_location=location)


def _find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


@flywheel_task(name="start-tracking", **MLFLOW_RETRIES)
def start_tracking(ref: RunRef) -> str:
    """The parent MLflow run of this flywheel run (found again on resume); the recipe as params."""
    experiment_id = configure(ref)
    client = MlflowClient()
    tags = {"flywheel.run": ref.run, "flywheel.kind": "parent"}
    run_id = _find_run(client, experiment_id, tags)
    if run_id is not None:
        _reopen(client, run_id)
    else:
        run_id = client.create_run(experiment_id, run_name=ref.run, tags={**tags, "flywheel.lake": ref.lake}).info.run_id
        # one parameter per recipe key (an empty section is no parameter), values cut to 500 characters
        items = [(k, str(v)[:500]) for k, v in flatten(ref.recipe.model_dump(mode="json")).items() if v != {}]
        for i in range(0, len(items), 90):
            mlflow.tracking.MlflowClient().log_batch(
                run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 90]]
            )
    return run_id


def iteration_run(ref: RunRef, iteration: int) -> str:
    """The nested run of one iteration (0 is the warm start), created once."""
    experiment_id = configure(ref)
    client = MlflowClient()
    tags = {"flywheel.run": ref.run, "flywheel.iteration": str(iteration)}
    run_id = _find_run(client, experiment_id, tags)
    if run_id is not None:
        _reopen(client, run_id)
    else:
        run_id = client.create_run(
            experiment_id, run_name=f"{ref.run}-iteration-{iteration}",
            tags={**tags, "mlflow.parentRunId": ref.mlflow_run_id or ""},
        ).info.run_id
    return run_id


def _reopen(client: MlflowClient, run_id: str) -> None:
    """A resumed run's MLflow run shows RUNNING again (it ended FAILED or KILLED before)."""
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
        if ERROR_TAG in run.data.tags:
            client.delete_tag(run_id, ERROR_TAG)


def end_tracking(ref: RunRef, status: str, error: str | None = None) -> None:
    """End the parent MLflow run and its iteration runs as ``FINISHED``, ``FAILED`` or ``KILLED``.

    Iterations run one after another, so when a run fails or is stopped only its latest iteration
    run takes that status; the earlier ones are ``FINISHED``. ``error`` (why it failed) is kept as
    the ``flywheel.error`` tag of the parent and of the latest iteration. Call it once the flow's
    outcome is known; a resumed run reopens both (``start_tracking``).
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
    if not ref.mlflow_run_id:
        return
    configure(ref)
    client = MlflowClient()
    parent = client.get_run(ref.mlflow_run_id)
    nested = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{ref.mlflow_run_id}'", max_results=1000
    )
    nested.sort(key=lambda r: int(r.data.tags.get("flywheel.iteration", "0")))
    for i, run in enumerate(nested):
        latest = i == len(nested) - 1
        _end(client, run.info.run_id, status if latest else "FINISHED", error if latest else None)
    _end(client, ref.mlflow_run_id, status, error)


@contextlib.contextmanager
def tracked(ref: RunRef) -> Iterator[None]:
    """The flow's outcome on its MLflow runs: FINISHED when the body returns, KILLED when it is
    interrupted, FAILED (with the error as a tag) when it raises. A tracking server that is gone by
    then is logged, never raised over the flow's own outcome."""
    status, error = "FINISHED", None
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as exc:
        status, error = "KILLED", f"{type(exc).__name__}: stopped"
        raise
    except BaseException as exc:
        status, error = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            end_tracking(ref, status, error)
        except Exception as exc:  # noqa: BLE001 — the flow's own result or error matters more
            log().warning("could not mark the MLflow runs %s (%s)", status, type(exc).__name__)


def _end(client: MlflowClient, run_id: str, status: str, error: str | None) -> None:
    if error and status != "FINISHED":
        client.set_tag(run_id, ERROR_TAG, error[:5000])
    client.set_terminated(run_id, status=status)


def _existing_version(client: MlflowClient, name: str, ref: RunRef, iteration: int, step: int):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in versions:
        t = v.tags or {}
        if t.get("flywheel.run") == ref.run and t.get("flywheel.iteration") == str(iteration) and t.get("flywheel.step") == str(step):
            return v
    return None


def _champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


@flywheel_task(name="register", **MLFLOW_RETRIES)
def register(
    ref: RunRef,
    model_uri: str,
    metrics: dict[str, float],
    iteration: int,
    step: int,
    datasets: list[str],
    parent_version: str | None = None,
    step_metrics: dict[str, float] | None = None,
) -> Registration:
    """Register the checkpoint of Improve step (``iteration``, ``step``) and decide whether ``champion`` moves to it.

    A replayed step (a resumed run) finds its version by tags and reports the decision made then."""
    configure(ref)
    client, name = MlflowClient(), ref.recipe.model_name
    version = _existing_version(client, name, ref, iteration, step)
    if version is None:
        log_step_metrics(ref, iteration, step, {**metrics, **(step_metrics or {})}, run_id=iteration_run(ref, iteration))
        version = create_version(ref, client, model_uri, metrics, iteration, step, datasets, parent_version)
    if (version.tags or {}).get(PROMOTED_TAG) is not None:
        return replayed_decision(client, name, version, metrics)
    return decide_champion(ref, client, name, version, metrics, iteration)


def create_version(ref: RunRef, client: MlflowClient, model_uri: str, metrics: dict[str, float], iteration: int, step: int,
                   datasets: list[str], parent_version: str | None):
    """Log the datasets' lineage and the pyfunc on the iteration's run, and create the model version tagged with both."""
    name, lake, run_id = ref.recipe.model_name, ref.open_lake(), iteration_run(ref, iteration)
    lineage = []
    with mlflow.start_run(run_id=run_id):
        for uri in datasets:
            m, where = lake.manifest(uri), lake.address(uri)
            lineage.append({"uri": uri, "table": where.stage, "partition": where.partition, "sha256": m.sha256, "rows": m.rows})
            context = "evaluation" if where.stage == "eval" else "training"
            with warnings.catch_warnings():  # MLflow registers its local-file source twice, then warns that file:// matches both
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
                dataset = mlflow.data.from_polars(lake.read(uri), source=uri, name=where.name, digest=m.sha256[:16])
            mlflow.log_input(dataset, context=context)
        info = mlflow.pyfunc.log_model(
            name=f"policy-step-{step}",
            python_model=_policy_code(),
            model_config={"prompt": ref.recipe.prompt_format(), "dtype": ref.recipe.model.dtype},
            artifacts={"checkpoint": ref.local_model(model_uri)},
            pip_requirements=_requirements(),
        )
        # Set after logging: MLflow takes the signature from predict's type hints, which carry
        # no inference params, so params={"max_new_tokens": ...} would be dropped when served.
        mlflow.models.set_signature(info.model_uri, mlflow.models.infer_signature(
            SIGNATURE_EXAMPLE[0], SIGNATURE_EXAMPLE[1], params=SIGNATURE_EXAMPLE[2]))
    tags = {
        "flywheel.run": ref.run,
        "flywheel.iteration": str(iteration),
        "flywheel.step": str(step),
        "flywheel.checkpoint": model_uri,
        "flywheel.checkpoint_sha256": _checkpoint_sha256(lake, model_uri),
        "flywheel.eval_reward": repr(metrics["eval_reward"]),
        "flywheel.eval_accuracy": repr(metrics["eval_accuracy"]),
        "flywheel.datasets": json.dumps(lineage),
        "flywheel.parent_version": parent_version or "",
    }
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already exists
    # A tracking server refuses a models:/ source unless model_id names it (SQLite does not care).
    return client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)


def replayed_decision(client: MlflowClient, name: str, version, metrics: dict[str, float]) -> Registration:
    """The champion decision recorded on ``version`` when its step first ran."""
    promoted = version.tags[PROMOTED_TAG] == "true"
    champion = _champion(client, name)
    return Registration(
        model_name=name, model_version=str(version.version), promoted=promoted,
        champion_version=str(version.version) if promoted or champion is None else str(champion.version),
        champion_reward=metrics["eval_reward"] if promoted else _reward(champion), promotion=_saved_checks(version),
    )  # fmt: skip


def decide_champion(ref: RunRef, client: MlflowClient, name: str, version, metrics: dict[str, float], iteration: int) -> Registration:
    """Run the promotion gate against the champion; move the alias if every check passes; record the verdicts."""
    champion = _champion(client, name)
    best = _reward(champion)
    promoted = champion is not None and str(champion.version) == str(version.version)  # MLflow mixes int and str versions
    saved = _saved_checks(version)
    # The alias already moved here (a run killed before recording its decision): the gate was passed then.
    checks = saved if promoted and saved else gate(ref, metrics, float("-inf") if promoted else best, iteration)
    blocked = blocked_by(checks)
    if not blocked:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        promoted, best = True, metrics["eval_reward"]
        log().info("model %s version %s is the new champion (held-out reward %.3f)", name, version.version, best)
    elif blocked != ["improvement"]:
        log().warning("model %s version %s is not promoted: blocked by %s", name, version.version,
                      ", ".join(f"{c} (value {_show(checks[c]['value'])}, limit {checks[c]['limit']})" for c in blocked))
    for check, verdict in checks.items():
        client.set_model_version_tag(name, version.version, PROMOTION_TAG + check, json.dumps(verdict))
    client.set_model_version_tag(name, version.version, PROMOTED_TAG, "true" if promoted else "false")
    return Registration(
        model_name=name, model_version=str(version.version), promoted=promoted,
        champion_version=str(version.version) if promoted else str(champion.version), champion_reward=best, promotion=checks,
    )  # fmt: skip


def _saved_checks(version) -> dict[str, dict[str, Any]]:
    return {k[len(PROMOTION_TAG):]: json.loads(v) for k, v in (version.tags or {}).items() if k.startswith(PROMOTION_TAG)}


def gate(ref: RunRef, metrics: dict[str, float], champion_reward: float, iteration: int) -> dict[str, dict[str, Any]]:
    """The recipe's promotion checks for a candidate with these held-out metrics (alignment.metrics.promotion_checks).

    Drift, KL and the reward gap are measured against the run's baseline (its iteration-0 evaluation).
    """
    from tasks.step_metrics import verifier_differs

    lake = ref.open_lake()
    base_uri = ref.stage_uri(0, "eval", 0)
    baseline = metrics if iteration == 0 or not lake.is_done(base_uri) else lake.manifest_doc(base_uri).get("metrics", metrics)
    return promotion_checks(ref.recipe.promotion, metrics, champion_reward, baseline, verifier_differs=verifier_differs(ref.recipe))


def log_step_metrics(ref: RunRef, iteration: int, step: int, values: dict[str, float | None], run_id: str | None = None) -> None:
    """Log ``values`` on the iteration's run (MLflow step = Improve step) and on the parent run (step = iteration * 100 + step)."""
    configure(ref)
    client, run_id = MlflowClient(), run_id or iteration_run(ref, iteration)
    now = int(time.time() * 1000)
    entries = [(k, float(v)) for k, v in values.items() if v is not None]
    batch = [mlflow.entities.Metric(k, v, now, step) for k, v in entries]
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])
    if ref.mlflow_run_id:
        parent = [mlflow.entities.Metric(k, v, now, iteration * 100 + step) for k, v in entries]
        for i in range(0, len(parent), 900):
            client.log_batch(ref.mlflow_run_id, metrics=parent[i : i + 900])


def _show(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _reward(version) -> float:
    return float(version.tags.get("flywheel.eval_reward", "-inf")) if version is not None else float("-inf")


def _checkpoint_sha256(lake, model_uri: str) -> str:
    """The committed checkpoint's manifest hash; empty for a user's own model directory used in place."""
    return lake.manifest(model_uri).sha256 if model_uri.startswith(("file://", "s3://")) else ""


def _policy_code() -> str:
    """The pyfunc's code file (models-from-code: nothing pickled; prompt format and dtype go in model_config)."""
    return str(Path(__file__).with_name("policy_entry.py"))


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"torch=={version('torch').split('+')[0]}", f"transformers=={version('transformers')}", "flywheel"]
