"""Opening a run: its name, its lake, its cache and its MLflow parent run, as one ``RunRef``."""

from __future__ import annotations

import time
from pathlib import Path

from alignment.recipe import Recipe
from tasks.context import RunRef
from tasks.register import start_tracking
from tasks.storage import normalize_uri


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run(recipe: Recipe, run_name: str | None) -> RunRef:
    """A reference to the run named ``run_name`` (re-using it resumes the run)."""
    run = run_name or default_run_name(recipe)
    cache = Path(".flywheel/cache").resolve()
    ref = RunRef(run=run, lake=normalize_uri(recipe.lake), recipe=recipe, cache_dir=str(cache))
    return ref.model_copy(update={"mlflow_run_id": start_tracking(ref)})
