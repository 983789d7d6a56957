"""What every task receives: a small, serialisable reference to the run (tasks pass references, never live objects)."""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any

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

    def stage_uri(self, iteration: int, stage: str, step: int | None = None) -> str:
        return self.open_lake().stage_uri(self.run, iteration, stage, step)

    def local_model(self, model_uri: str) -> str:
        """A local directory with the committed checkpoint at ``model_uri``."""
        if not model_uri.startswith(("file://", "s3://")):
            return model_uri  # a user's own model directory, used in place
        return str(self.open_lake().get_dir(model_uri, Path(self.cache_dir) / "models"))

    def policy_version(self, model_uri: str) -> str:
        """A checkpoint's name within its run, e.g. ``iteration=1/checkpoint/step=1`` (stable across re-runs).

        Cut at the run's own prefix, not at the first ``/{run}/``: a lake under a folder that shares
        the run's name (``.../exp/lake/exp/...``) must not leak its path into the datasets.
        """
        prefix = f"{self.open_lake().uri}/models/{self.run}/"
        return model_uri[len(prefix):] if model_uri.startswith(prefix) else model_uri


def _unvisited(value: Any) -> Any:
    """``value`` with a ``RunRef`` (bare or ``unmapped``) wrapped in Prefect's ``quote``, so Prefect
    neither walks the recipe inside it looking for futures nor records it as a task input."""
    from prefect.utilities.annotations import quote, unmapped

    if isinstance(value, RunRef):
        return quote(value)
    if isinstance(value, unmapped) and isinstance(value.value, RunRef):
        return unmapped(quote(value.value))
    return value


def _unvisited_all(values: Any) -> Any:
    if isinstance(values, dict):
        return {key: _unvisited(value) for key, value in values.items()}
    return [_unvisited(value) for value in values]


def _in_process_runner() -> bool:
    """Whether the flow's task runner runs tasks in this process (threads), where Prefect unwraps the
    ``quote`` itself; a runner that ships parameters elsewhere (Ray) may not carry it intact."""
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    context = FlowRunContext.get()
    return context is not None and isinstance(context.task_runner, ThreadPoolTaskRunner)


def flywheel_task(**options: Any):
    """Prefect's ``@task`` without its result cache, and without walking the run's reference.

    A stage's output is its committed lake stage, which a resumed run reuses, so hashing a
    task's inputs for a cache key and persisting its return value only cost time: about 4 ms of a
    task run's 9 on 2 cores (bench/bench_orchestration.py). Every task also takes the run's
    ``RunRef``, whose recipe Prefect would otherwise visit field by field, twice per task run, to
    find futures that a reference never holds: another 2 ms. Prefect unwraps the ``quote`` before
    the task body runs, so the body receives the ``RunRef`` itself.
    """
    from prefect.cache_policies import NONE

    return lambda fn: _task_class()(fn=fn, cache_policy=NONE, **options)


@functools.cache
def _task_class() -> type:
    """Prefect's ``Task`` quoting the ``RunRef`` it is called with (made once, when a task is first declared:
    importing this module does not import Prefect)."""
    from prefect import Task

    class FlywheelTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(*_unvisited_all(args), **_unvisited_all(kwargs))

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            if _in_process_runner():
                args, kwargs = _unvisited_all(args), _unvisited_all(kwargs)
            return super().submit(*args, **kwargs)

        def map(self, *args: Any, **kwargs: Any) -> Any:
            if _in_process_runner():
                args, kwargs = _unvisited_all(args), _unvisited_all(kwargs)
            return super().map(*args, **kwargs)

    return FlywheelTask


def local_cache_dir() -> str:
    """This machine's cache of models fetched from the lake: ``$FLYWHEEL_CACHE_DIR``, else ``./.flywheel/cache``."""
    return str(Path(os.environ.get("FLYWHEEL_CACHE_DIR") or ".flywheel/cache").resolve())


def log() -> logging.Logger:
    """Prefect's run logger inside a flow or task, the ``flywheel`` logger outside one."""
    try:
        from prefect import get_run_logger

        return get_run_logger()  # type: ignore[return-value]
    except Exception:
        return logging.getLogger("flywheel")


def where(iteration: int, step: int | None = None) -> str:
    """Where a console line's work lies: ``g=2`` (an iteration's Grow), ``g=2 step 3`` (a step of it)."""
    return f"g={iteration}" if step is None else f"g={iteration} step {step}"


def figure(value: float | None, digits: int = 3) -> str:
    """A number for a console line: ``digits`` significant digits, never an exponent (0.922, 12.3, 1234).
    Only what people read is rounded: the lake and MLflow keep every digit."""
    if value is None:
        return "-"
    if value == 0 or not math.isfinite(value):
        return f"{value:.{digits}f}" if value == 0 else str(value)
    return f"{value:.{max(digits - 1 - math.floor(math.log10(abs(value))), 0)}f}"


def progress_lines():
    """Long work's progress (training steps, samples drawn) as a stage line about once a minute
    (``alignment.progress``): what the log, the Prefect UI and a worker's output show, where no bar is drawn."""
    from alignment.progress import reporting

    def report(done: int, total: int, unit: str, detail: str, seconds: float) -> None:
        left = seconds / done * (total - done) if done else 0.0
        log().info("%d of %d %s%s, about %s left", done, total, unit, f", {detail}" if detail else "", duration(left))

    return reporting(report)


def duration(seconds: float) -> str:
    """A time for a console line: ``40 s``, ``12 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


TRUNCATION_WARNING = 0.05  # the share of completions cut at max_new_tokens above which a stage says so


def warn_truncated(what: str, share: float | None, of: str, setting: str, value: int) -> None:
    """One warning line when more than ``TRUNCATION_WARNING`` of ``of`` stopped at ``setting`` (finish_reason
    "length"): the run is limited by it."""
    if share is not None and share > TRUNCATION_WARNING:
        log().warning("%s: %.3g%% of %s stopped at %s=%d; raise it if answers are cut", what, 100 * share, of, setting, value)


def io_retries(*delays: float):
    """Retry a plain call (one that is not a task run of its own) after each of ``delays`` seconds when it
    fails on I/O, as ``retry_on_io`` has Prefect retry a task: an S3 endpoint that restarts or a lake
    that answers late. A ``UserError`` is raised at once."""
    import time

    from alignment.errors import UserError

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for delay in delays:
                try:
                    return fn(*args, **kwargs)
                except UserError:
                    raise
                except Exception as error:  # noqa: BLE001  (I/O failures come as many types)
                    first = (str(error).splitlines() or [""])[0]
                    log().warning("%s failed (%s: %s); retrying in %g s", fn.__name__, type(error).__name__, first, delay)
                    time.sleep(delay)
            return fn(*args, **kwargs)
        return call
    return wrap


def retry_on_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O failures, never a mistake that is the user's to fix.

    A missing prompt file or a broken reward fails the same way every time; retrying it only
    repeats the error and its traceback after a delay (retries are for I/O).
    """
    from alignment.errors import UserError

    try:
        state.result()
    except UserError:  # recipe, reward, input and configuration errors alike
        return False
    except BaseException:
        return True
    return True
