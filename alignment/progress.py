"""Progress of long work — training steps, samples drawn — where no bar is drawn: a run's log, the Prefect
UI, a worker's output.

A stage opens ``reporting(report)`` around the work; the loops inside (``alignment.training.train_loop``,
the samplers) count what they have done on a ``Ticker``, which calls ``report(done, total, unit, detail,
seconds)`` at most every ``$FLYWHEEL_PROGRESS_SECONDS`` (60 by default) and never for the last unit: the
stage's own closing line says how it ended. Outside the block a ticker costs a clock read and says nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from alignment.errors import UserError

PROGRESS_SECONDS_ENV = "FLYWHEEL_PROGRESS_SECONDS"
PROGRESS_SECONDS = 60.0

Report = Callable[[int, int, str, str, float], None]  # done, total, unit ("steps", "samples"), detail, seconds
_report: ContextVar[tuple[Report, float] | None] = ContextVar("flywheel_progress", default=None)


def progress_seconds() -> float:
    """How often long work reports its progress: ``$FLYWHEEL_PROGRESS_SECONDS`` (a positive number of seconds),
    else 60. A run checks it before any work starts, so a typo is one sentence, not a failed stage."""
    value = os.environ.get(PROGRESS_SECONDS_ENV, "").strip()
    if not value:
        return PROGRESS_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{PROGRESS_SECONDS_ENV}={value!r} is not a positive number of seconds; set it to one "
                        f"(how often long work reports its progress), or unset it for every {PROGRESS_SECONDS:.0f} s.")
    return seconds


@contextlib.contextmanager
def reporting(report: Report, every: float | None = None) -> Iterator[None]:
    """Within the block, the tickers of this thread report to ``report`` every ``every`` seconds (default:
    ``progress_seconds()``)."""
    token = _report.set((report, progress_seconds() if every is None else every))
    try:
        yield
    finally:
        _report.reset(token)


def reporting_now() -> bool:
    """Whether a ``reporting`` block is open on this thread (a ticker made now would report)."""
    return _report.get() is not None


class Ticker:
    """Counts ``total`` units of one piece of work and reports, when a ``reporting`` block is open on this
    thread, after the first count that comes ``every`` seconds or more after the start or the last report."""

    def __init__(self, total: int, unit: str):
        self.report, self.every = _report.get() or (None, 0.0)
        self.total, self.unit = total, unit
        self.started = self.reported = time.monotonic()

    def __call__(self, done: int, detail: str = "") -> None:
        if self.report is None or done >= self.total or time.monotonic() - self.reported < self.every:
            return
        self.reported = time.monotonic()
        self.report(done, self.total, self.unit, detail, self.reported - self.started)
