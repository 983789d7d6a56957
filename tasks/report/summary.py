"""``{lake}/runs/{run}/summary.json``: the per-step record dashboards and scripts read, updated as the run goes.

When the run ends (``Summary.stop``, the last line of both flows) it records why, logs the HTML report
on the parent MLflow run and publishes the run's summary as a Prefect markdown artifact on the flow
run (key ``{run}-summary``): the per-step table, the champion, the MLflow run and the lake. It does not
end the MLflow runs: ``tasks.tracking.registry.tracked``, around the whole flow, ends the parent and
iteration runs with the flow's outcome (FINISHED, FAILED or KILLED).
"""

from __future__ import annotations

import re
from typing import Any

from tasks.context import RunRef, flywheel_task, io_retries, log
from tasks.results import Selection, Registration


class Summary:
    """Builds ``summary.json``, the per-step document dashboards and scripts read; ``save`` writes it to the lake."""

    def __init__(self, ref: RunRef, algorithm: str):
        self.ref = ref
        self.doc: dict[str, Any] = {
            "run": ref.run, "algorithm": algorithm, "lake": ref.lake, "recipe": ref.recipe.name,
            "run_uri": ref.open_lake().run_uri(ref.run), "mlflow": mlflow_where(ref),
            "baseline": None, "iterations": [], "champion": None, "stopped": None,
        }

    def baseline(self, metrics: dict[str, float], reg: Registration) -> None:
        self.doc["baseline"] = {**metrics, "model_version": reg.model_version}
        self._champion(reg)
        save_summary(self.ref, self.doc)

    def step(self, iteration: int, step: int, kept: Selection, metrics: dict | None, reg: Registration | None, *,
             tau: float | None = None, **extra: Any) -> None:
        """One row of the per-step table; ``tau`` is the ReST filter's threshold (None for top-k and for pairs)."""
        row = {
            "iteration": iteration, "step": step, "tau": tau, "samples": kept.samples,
            "kept": kept.kept, "eval_reward": None, "eval_accuracy": None, "model_version": None,
            "promoted": False, **extra,
        }
        if metrics is not None and reg is not None:
            row.update(metrics)
            row.update(model_version=reg.model_version, promoted=reg.promoted)
            # each check of the champion gate: {value, limit, passed}; which ones blocked
            row.update(promotion=reg.promotion, blocked_by=reg.blocked_by)
            self._champion(reg)
        self.doc["iterations"].append(row)
        save_summary(self.ref, self.doc)

    def stop(self, reason: str) -> dict[str, Any]:
        """The run is over: save the summary, publish the report and the summary artifact (the flow's
        ``tasks.tracking.registry.tracked`` ends the MLflow runs with its outcome)."""
        self.doc["stopped"] = reason
        save_summary(self.ref, self.doc)
        if report := publish_report(self.ref):  # the HTML report (flywheel report RUN), on the parent MLflow run
            self.doc["report"] = report
            save_summary(self.ref, self.doc)
        publish_summary(self.doc)
        return self.doc

    def _champion(self, reg: Registration) -> None:
        # The first registration records whoever holds the alias (possibly another run's model that
        # this run never beats); after that, only a promotion changes it.
        if reg.promoted or self.doc["champion"] is None:
            self.doc["champion"] = {"model_name": reg.model_name, "version": reg.champion_version, "eval_reward": reg.champion_reward}


@io_retries(2, 5, 15)
def save_summary(ref: RunRef, doc: dict[str, Any]) -> str:
    """Write ``summary.json`` (a plain call, not a task run: one small write, retried on I/O failure as it was)."""
    uri = f"{ref.open_lake().run_uri(ref.run)}/summary.json"
    ref.open_lake().put_json(uri, doc)
    return uri


@flywheel_task(name="publish-report")
def publish_report(ref: RunRef) -> str | None:
    """Render the run's HTML report and log it as an artifact of the parent MLflow run; its artifact URI.

    A report is a convenience: a failure is logged and the run ends as it would have.
    """
    import tempfile

    from tasks.report.html import write_report

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_report(ref.lake, ref.run, f"{tmp}/{ref.run}-report.html", ref.recipe.s3.model_dump(exclude_none=True))
            if not ref.mlflow_run_id:
                return None
            from mlflow import MlflowClient

            from tasks.tracking.registry import configure

            configure(ref)
            client = MlflowClient()
            client.log_artifact(ref.mlflow_run_id, str(path), "report")
            return f"{client.get_run(ref.mlflow_run_id).info.artifact_uri}/report/{path.name}"
    except Exception as exc:  # noqa: BLE001
        log().warning("no HTML report for run %s: %s: %s", ref.run, type(exc).__name__, exc)
        return None


def mlflow_where(ref: RunRef) -> dict[str, Any]:
    """The run's MLflow tracking URI, experiment and parent run id, and a UI link when it is a server."""
    cfg = ref.recipe.mlflow
    where = {"tracking_uri": cfg.tracking_uri, "experiment": cfg.experiment, "run_id": ref.mlflow_run_id, "url": None}
    if ref.mlflow_run_id and cfg.tracking_uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient

        try:
            experiment = MlflowClient(cfg.tracking_uri).get_run(ref.mlflow_run_id).info.experiment_id
        except Exception as exc:  # a link is a convenience: the run goes on without it
            log().warning("no link to MLflow run %s: %s", ref.mlflow_run_id, exc)
        else:
            where["url"] = f"{cfg.tracking_uri.rstrip('/')}/#/experiments/{experiment}/runs/{ref.mlflow_run_id}"
    return where


def summary_key(run: str) -> str:
    """The summary artifact's key: Prefect allows lowercase letters, digits and dashes."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9]+", "-", f"{run}-summary".lower())).strip("-")


def console_table(summary: dict[str, Any]) -> str:
    """The per-step table ``flywheel run`` prints: iteration, step, tau, samples, kept, held-out reward and accuracy (reward >= 1)."""
    head = f"{'iter':>4} {'step':>4} {'tau':>7} {'samples':>8} {'kept':>7} {'eval_reward':>12} {'accuracy':>8} {'version':>8}"
    lines = [head, "-" * len(head)]
    b = summary.get("baseline") or {}
    if b:
        lines.append(f"{0:>4} {0:>4} {'-':>7} {'-':>8} {'-':>7} {b['eval_reward']:>12.3f} {b['eval_accuracy']:>8.3f} {b['model_version']:>8}")
    for r in summary.get("iterations", []):
        tau = "-" if r.get("tau") is None else f"{r['tau']:.3f}"
        reward = "skipped" if r.get("eval_reward") is None else f"{r['eval_reward']:.3f}"
        accuracy = "-" if r.get("eval_accuracy") is None else f"{r['eval_accuracy']:.3f}"
        version = (r.get("model_version") or "-") + ("*" if r.get("promoted") else "")
        guards = [c for c in r.get("blocked_by") or [] if c != "improvement"]  # "3 (kl)": a guard blocked the promotion
        version += f" ({','.join(guards)})" if guards else ""
        lines.append(f"{r['iteration']:>4} {r['step']:>4} {tau:>7} {r['samples']:>8} {r['kept']:>7} {reward:>12} {accuracy:>8} {version:>8}")
    champ = summary.get("champion")
    if champ:
        lines.append(f"champion: models:/{champ['model_name']}@champion = version {champ['version']} (held-out reward {champ['eval_reward']:.3f}); * = promoted")
    if summary.get("stopped"):
        lines.append(f"stopped: {summary['stopped']}")
    return "\n".join(lines)


def summary_markdown(doc: dict[str, Any]) -> str:
    """The summary as markdown: the per-step table, the champion, the MLflow run and the lake."""
    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    rows = ["| iteration | step | tau | samples | kept | held-out reward | accuracy | version |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if b := doc.get("baseline"):
        rows.append(f"| 0 | 0 | - | - | - | {num(b['eval_reward'])} | {num(b.get('eval_accuracy'))} | {b['model_version']} |")
    for r in doc.get("iterations", []):
        version = (r.get("model_version") or "-") + (" (promoted)" if r.get("promoted") else "")
        reward = num(r.get("eval_reward")) if r.get("eval_reward") is not None else f"skipped: {r.get('skipped', '')}"
        rows.append(f"| {r['iteration']} | {r['step']} | {num(r.get('tau'))} | {r['samples']} | {r['kept']} | "
                    f"{reward} | {num(r.get('eval_accuracy'))} | {version} |")
    run_uri = doc.get("run_uri") or f"{doc['lake']}/runs/{doc['run']}"
    lines = [f"## Run `{doc['run']}` ({doc['algorithm']}, recipe `{doc['recipe']}`)", "", f"Stopped: {doc.get('stopped')}.", "", *rows, ""]
    if champ := doc.get("champion"):
        lines.append(f"- **Champion**: `models:/{champ['model_name']}@champion` = version {champ['version']} "
                     f"(held-out reward {num(champ['eval_reward'])})")
    tracking = doc.get("mlflow") or {}
    if tracking.get("run_id"):
        run = f"[{tracking['run_id']}]({tracking['url']})" if tracking.get("url") else f"`{tracking['run_id']}`"
        lines.append(f"- **MLflow run**: {run} in experiment `{tracking['experiment']}` at `{tracking['tracking_uri']}`")
    lines.append(f"- **Lake**: `{doc['lake']}` (one Parquet table per stage, partitioned by run and iteration: "
                 f"`flywheel sql \"SELECT ... FROM scored WHERE run = '{doc['run']}'\"`, `flywheel inspect {run_uri}`)")
    lines.append(f"- **Summary**: `{run_uri}/summary.json`")
    if doc.get("report"):
        lines.append(f"- **Report**: [{doc['run']}-report.html]({doc['report']}) (MLflow artifact; `flywheel report {doc['run']}`)")
    return "\n".join(lines)


def publish_summary(doc: dict[str, Any]) -> str | None:
    """Publish ``doc`` as a markdown artifact on the current flow run; its key, or None outside a flow run."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    key = summary_key(doc["run"])
    create_markdown_artifact(markdown=summary_markdown(doc), key=key,
                             description=f"Summary of run {doc['run']}: per-step table, champion, MLflow run, lake.")
    return key
