"""What every task receives: a small, serialisable reference to the run (STYLE #6)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from alignment.recipe import Recipe
from tasks.lake import Lake


class RunRef(BaseModel):
    """The run's name, where its lake is, its recipe and its MLflow parent run: references only."""

    model_config = ConfigDict(frozen=True)

    run: str
    lake: str
    recipe: Recipe
    cache_dir: str
    mlflow_run_id: str | None = None

    def open_lake(self) -> Lake:
        return Lake(self.lake, self.recipe.s3.model_dump(exclude_none=True))

    def stage(self, iteration: int, stage: str, step: int | None = None) -> str:
        return self.open_lake().stage_uri(self.run, iteration, stage, step)

    def local_model(self, model_uri: str) -> str:
        """A local directory with the committed checkpoint at ``model_uri``."""
        if not model_uri.startswith(("file://", "s3://")):
            return model_uri  # a user's own model directory, used in place
        return str(self.open_lake().get_dir(model_uri, Path(self.cache_dir) / "models"))

    def policy_version(self, model_uri: str) -> str:
        """A checkpoint's name within its run, e.g. ``iteration=1/checkpoint/step=1`` (stable across re-runs)."""
        return model_uri.split(f"/{self.run}/", 1)[-1]


def log() -> logging.Logger:
    """Prefect's run logger inside a flow or task, the ``flywheel`` logger outside one."""
    try:
        from prefect import get_run_logger

        return get_run_logger()  # type: ignore[return-value]
    except Exception:
        return logging.getLogger("flywheel")
