"""The errors that are the user's to fix: the CLI prints their one sentence, not a traceback.

Every such error is an ``alignment.errors.UserError`` (a module that imports no model library), so
catching one costs nothing: ``flywheel stack status`` or a bad ``--set`` must not import torch just
to be able to report a mistake. The classes below predate that hierarchy or subclass ``OSError``;
they are looked up only in modules already imported (one that was never imported raised nothing).
"""

from __future__ import annotations

import sys

from alignment.errors import UserError

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
    from alignment.errors import RunFailure
    from flows.server import EmbeddedServerError, not_answering  # the standard library only

    if isinstance(exc, (EmbeddedServerError, RunFailure)):
        return str(exc)
    if isinstance(exc, RuntimeError) and "attempting to connect to ephemeral Prefect API server" in str(exc):
        import os  # the server Prefect starts itself (a flow run outside ``flywheel run``)

        return not_answering(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20"))
    return None


def __getattr__(name: str):
    if name == "USER_ERRORS":  # the former constant, for callers that import it: computed now
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
