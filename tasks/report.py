"""``{lake}/{run}/summary.json``: the per-step record dashboards and scripts read, updated as the run goes."""

from __future__ import annotations

from typing import Any


from tasks.context import RunRef, flywheel_task


class Summary:
    """Builds the summary document of DESIGN.md; ``save`` writes it to the lake."""

    def __init__(self, ref: RunRef, algorithm: str):
        self.ref = ref
        self.doc: dict[str, Any] = {
            "run": ref.run, "algorithm": algorithm, "lake": ref.lake, "recipe": ref.recipe.name,
            "baseline": None, "iterations": [], "champion": None, "stopped": None,
        }

    def baseline(self, metrics: dict[str, float], reg: dict[str, Any]) -> None:
        self.doc["baseline"] = {**metrics, "model_version": reg["model_version"]}
        self._champion(reg)
        save_summary(self.ref, self.doc)

    def step(self, iteration: int, step: int, kept: dict, metrics: dict | None, reg: dict | None, **extra: Any) -> None:
        row = {
            "iteration": iteration, "step": step, "tau": kept.get("tau"), "samples": kept["samples"],
            "kept": kept["kept"], "eval_reward": None, "eval_accuracy": None, "model_version": None,
            "promoted": False, **extra,
        }
        if metrics is not None and reg is not None:
            row.update(metrics)
            row.update(model_version=reg["model_version"], promoted=reg["promoted"])
            self._champion(reg)
        self.doc["iterations"].append(row)
        save_summary(self.ref, self.doc)

    def stop(self, reason: str) -> dict[str, Any]:
        self.doc["stopped"] = reason
        save_summary(self.ref, self.doc)
        return self.doc

    def _champion(self, reg: dict[str, Any]) -> None:
        # The first registration records whoever holds the alias (possibly another run's model that
        # this run never beats); after that, only a promotion changes it.
        if reg["promoted"] or self.doc["champion"] is None:
            self.doc["champion"] = {
                "model_name": reg["model_name"], "version": reg["champion_version"], "eval_reward": reg["champion_reward"],
            }


@flywheel_task(name="save-summary", retries=3, retry_delay_seconds=[2, 5, 15])
def save_summary(ref: RunRef, doc: dict[str, Any]) -> str:
    uri = f"{ref.open_lake().run_uri(ref.run)}/summary.json"
    ref.open_lake().put_json(uri, doc)
    return uri
