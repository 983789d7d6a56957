"""The errors that are the user's to fix: the CLI prints their one sentence, not a traceback.

Every such error is an ``alignment.errors.UserError`` (a module that imports no model library), so
catching one costs nothing: ``flywheel stack status`` or a bad ``--set`` must not import torch just
to be able to report a mistake. The classes below predate that hierarchy or subclass ``OSError``;
they are looked up only in modules already imported (one that was never imported raised nothing).

A failure once a run's work has started (``stopped``) is said the same way, with where it happened and
how to resume: a sampler server that went away, S3 refusing the lake, the MLflow server stopping, a
full disk, a user's reward raising on a grown sample. It is a ``RunFailure``: exit code 1, and its
traceback goes to the run's log only.
"""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

from alignment.errors import RunFailure, UserError

_ALSO = {
    "alignment.recipe": "RecipeError",
    "alignment.rewards": "RewardError",
    "tasks.lake": "StageNotFound",
    "tasks.lake.s3": "LakeAccessError",
    "infra.stack": "StackInputError",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """``UserError`` and the user-error classes of the modules loaded so far; for an ``except`` clause."""
    loaded = (getattr(sys.modules[m], name, None) for m, name in _ALSO.items() if m in sys.modules)
    return (UserError, *(c for c in loaded if isinstance(c, type)))


def service_failure(exc: BaseException) -> str | None:
    """One sentence for a service flywheel starts itself that did not come up, or a ``RunFailure`` of the
    run's work (not the user's input: the CLI exits 1 with it, without a traceback); None for anything else."""
    from flows.server import EmbeddedServerError, not_answering  # the standard library only

    if isinstance(exc, (EmbeddedServerError, RunFailure)):
        return str(exc)
    if isinstance(exc, RuntimeError) and "attempting to connect to ephemeral Prefect API server" in str(exc):
        import os  # the server Prefect starts itself (a flow run outside ``flywheel run``)

        return not_answering(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20"))
    return None


# Modules of tasks/ whose frames say where a run stopped (the innermost one a failure passed through).
_STAGES = {"inputs": "preparing the inputs", "grow": "grow", "score": "scoring", "filter": "filter", "pair": "pairing",
           "train": "training", "evaluate": "evaluation", "step_metrics": "the step's metrics", "registry": "MLflow tracking"}
_TASKS = Path(__file__).resolve().parent.parent / "tasks"
_DISK = {errno.ENOSPC: "The disk is full", errno.EDQUOT: "The disk quota is used up", errno.EROFS: "The file system is read-only",
         errno.EACCES: "Permission was denied", errno.EPERM: "Permission was denied"}
# How libraries that write through their own I/O layer (polars, safetensors, torch) say the disk is full.
_FULL = re.compile(r"No space left on device|os error 28|StorageFull")


class RunStopped(RunFailure):
    """A run's work failed for a reason the user can act on. Every stage it committed stays, so the same
    command resumes it once the cause is fixed; ``log`` (set by the CLI) is where the traceback went."""

    def __init__(self, run: str, why: str, where: str | None = None):
        super().__init__(run, why, where)
        self.run, self.why, self.where = run, why, where
        self.log: str | Path | None = None

    def __str__(self) -> str:
        at = f" in {self.where}" if self.where else ""
        log = f" (traceback: {self.log})" if self.log else ""
        return f"run {self.run} stopped{at}: {self.why}; then resume it with the same command and --run-name {self.run}{log}."


def stopped(exc: BaseException, run: str, tracking_uri: str | None = None) -> RunStopped | None:
    """``exc``, raised by a run's flow, as one sentence the user can act on; None for anything else (a bug,
    whose traceback is the useful thing to show)."""
    why = _why(exc, tracking_uri)
    if why is None:
        return None
    why = re.sub(r"[.!]\s+(?=[A-Z])", "; ", " ".join(why.split())).rstrip(". ")
    if why.endswith("?") and ": " in why:  # "Cannot reach X: is the server running?" -> "Cannot reach X (is the server running?)"
        head, _, question = why.rpartition(": ")
        why = f"{head} ({question})"
    return RunStopped(run, why, _where(exc))


def _why(exc: BaseException, tracking_uri: str | None) -> str | None:
    if isinstance(exc, (RunFailure, *user_errors())):
        return str(exc)
    chain = []
    while exc is not None and exc not in chain:  # the failure and what caused it
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in _DISK:
            what = f": {e.filename}" if e.filename else ""
            return f"{_DISK[e.errno]} ({e.strerror}{what}): make room there, or point the lake and FLYWHEEL_CACHE_DIR elsewhere"
        if _FULL.search(str(e)):
            return "The disk is full: make room there, or point the lake and FLYWHEEL_CACHE_DIR at a disk with room"
    mlflow = sys.modules.get("mlflow.exceptions")
    if mlflow is not None and isinstance(chain[0], mlflow.MlflowException) and "API request to" in str(chain[0]):
        cause = " ".join(str(chain[0]).split("failed with exception", 1)[-1].split())[:160]
        return (f"The MLflow tracking server at {tracking_uri or 'mlflow.tracking_uri'} stopped answering ({cause}): "
                "start it again (flywheel stack up) or set mlflow.tracking_uri to a running server")
    return None


def _where(exc: BaseException) -> str | None:
    """The stage the failure came from, by the innermost frame of a stage module in its traceback
    (a failure that came back from another process has none)."""
    stage, iteration, tb = None, None, exc.__traceback__
    while tb is not None:
        path = Path(tb.tb_frame.f_code.co_filename)
        if path.stem in _STAGES and _TASKS in path.parents:
            if path.stem != stage:
                stage, iteration = path.stem, None
            found = tb.tb_frame.f_locals.get("iteration")
            iteration = found if isinstance(found, int) else iteration
        tb = tb.tb_next
    if stage is None:
        return None
    return _STAGES[stage] + (f" (iteration {iteration})" if iteration is not None else "")


def __getattr__(name: str):
    if name == "USER_ERRORS":  # the former constant, for callers that import it: computed now
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
