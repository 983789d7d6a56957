"""What ``flywheel run`` prints while it runs: one line per stage on the console, everything else to the run's log.

``RunConsole`` moves Prefect's, MLflow's and Python's own lines to ``.flywheel/logs/RUN.log`` for the
run and puts ``StageLines`` on the run loggers; ``where_lines`` are the closing lines that say where
to look next.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUR_CODE = tuple(str(ROOT / d) + os.sep for d in ("alignment", "tasks", "flows"))


LINE_CHARS = 200  # the longest console line a stage prints


class StageLines(logging.Handler):
    """Prints the flow's and tasks' own INFO and WARNING lines (not Prefect's engine lines) as one console line each.

    ``iteration 1 · filter · kept 623 of 5000 · 0.1 s``: the task's name, its message and how long
    the task run has taken so far (a warning, such as completions cut at ``max_new_tokens``, without
    the time). Records come from Prefect's run loggers; only those logged by flywheel's own code
    (``log().info(...)`` or ``log().warning(...)`` in a task, ``print`` in a flow) are shown.
    """

    def __init__(self, stream=None):
        super().__init__(logging.INFO)
        self.stream = stream
        self.last = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        if not record.pathname.startswith(OUR_CODE):
            return
        try:
            stage = (getattr(record, "task_run_name", None) or "flow").rsplit("-", 1)[0]
            took, message = self._took(), record.getMessage()
            if stage != "flow" and message[:4].lower() != stage[:4]:  # "filter · filter g=1 ..." says it twice
                message = f"{stage} · {message}"
            head, tail = message, ""
            if record.levelno >= logging.WARNING:
                head = f"{record.levelname.lower()}: {message}"
            elif took is not None:  # seconds to 4 significant digits at most: 0.1 s, 12.3 s, 1234 s
                tail = f" · {took:.1f} s" if took < 100 else f" · {took:.0f} s"
            if len(head) + len(tail) > LINE_CHARS:  # a long message is cut, not the time it took
                head = head[: LINE_CHARS - len(tail) - 1] + "…"
            _write(self.stream or sys.stdout, head + tail)  # not print(): in a run, Prefect's log_prints sends it back here
        except Exception:
            self.handleError(record)

    def _took(self) -> float | None:
        """Seconds since the current task run started (else since the previous line)."""
        from prefect.context import TaskRunContext

        now, since = time.monotonic(), self.last
        self.last = now
        ctx = TaskRunContext.get()
        start = getattr(getattr(ctx, "task_run", None), "start_time", None)
        if start is not None:
            from datetime import datetime, timezone

            return max(0.0, (datetime.now(timezone.utc) - start).total_seconds())
        return now - since


def _write(stream, line: str) -> None:
    """One console line. While a training progress bar is drawn (a terminal), tqdm clears it, writes the
    line and draws it again below, so the line is not glued to the bar."""
    bars = sys.modules.get("tqdm.std")  # tqdm keeps its live bars in tqdm._instances; it has no public list
    if bars is not None and any(not bar.disable for bar in list(bars.tqdm._instances)):
        bars.tqdm.write(line, file=stream)
    else:
        stream.write(line + "\n")
    stream.flush()


class RunConsole:
    """What ``flywheel run`` prints, set up for the duration of the run.

    Quiet (the default): Prefect's console handler, MLflow's handler and Python's warnings write to
    ``log_path``; the console gets ``StageLines``. Verbose: everything prints as before, and the
    stage lines are not repeated. ``close()`` puts the handlers back (for callers that go on, such
    as tests calling ``main``); a command-line process keeps them until it exits, so lines logged
    at exit (Prefect's "Stopping temporary server") go to the log too.
    """

    def __init__(self, log_path: Path, verbose: bool):
        self.log_path, self.verbose = log_path, verbose
        self.saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self.levels: list[tuple[logging.Logger, int]] = []
        self.set_env: list[str] = []
        self.stage = StageLines()

    def open(self) -> RunConsole:
        from prefect.logging.configuration import ensure_logging_setup
        from prefect.logging.handlers import PrefectConsoleHandler

        ensure_logging_setup()  # Prefect's handlers exist before they are replaced (the flows load later)
        run_loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        console = next((h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)), None)
        self.to_file = to_file = logging.FileHandler(self.log_path, delay=True, encoding="utf-8")
        to_file.setFormatter(console.formatter if console else logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
        for name in ("", "uvicorn", "fastapi"):  # Prefect's console handler sits on these
            logger = logging.getLogger(name)
            kept = [h for h in logger.handlers if not isinstance(h, PrefectConsoleHandler)]
            self._replace(logger, [*kept, to_file] if len(kept) < len(logger.handlers) else logger.handlers, logger.propagate)
        if "mlflow" not in sys.modules and "MLFLOW_CONFIGURE_LOGGING" not in os.environ:
            # MLflow, imported later with the flows, would put its own stderr handler back on its loggers
            # (a fresh tracking database's "Creating initial MLflow database tables" lines on the console).
            os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
            self.set_env.append("MLFLOW_CONFIGURE_LOGGING")
        mlflow = logging.getLogger("mlflow")  # MLflow's INFO and WARNING lines
        self._replace(mlflow, [to_file], False)
        self.levels.append((mlflow, mlflow.level))
        mlflow.setLevel(logging.INFO)
        logging.captureWarnings(True)  # Python warnings (MLflow's UserWarnings) become "py.warnings" records
        self._replace(logging.getLogger("py.warnings"), [to_file], False)
        for logger in run_loggers:
            self._replace(logger, [*logger.handlers, self.stage], logger.propagate)
        _QUIET.append(self)
        return self

    def _replace(self, logger: logging.Logger, handlers: list[logging.Handler], propagate: bool) -> None:
        self.saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers[:] = handlers
        logger.propagate = propagate

    def close(self) -> None:
        if self in _QUIET:
            _QUIET.remove(self)
        for logger, handlers, propagate in reversed(self.saved):
            logger.handlers[:] = handlers
            logger.propagate = propagate
        for logger, level in self.levels:
            logger.setLevel(level)
        for name in self.set_env:
            os.environ.pop(name, None)
        if self.saved:
            logging.captureWarnings(False)
        self.saved.clear()
        self.levels.clear()
        self.set_env.clear()


_QUIET: list[RunConsole] = []  # this process's quiet run console, while it is open


def quiet() -> bool:
    """Whether a quiet ``RunConsole`` is open in this process (a ``flywheel run`` without ``--verbose``)."""
    return bool(_QUIET)


def to_run_log(name: str) -> None:
    """While a quiet run console is open, logger ``name``'s lines go to the run's log, not the console: for a
    library that puts its own console handler on its logger when it is imported (Ray's startup lines)."""
    for console in _QUIET:
        console._replace(logging.getLogger(name), [console.to_file], False)


def ray_worker_lines() -> None:
    """Ray's worker setup hook for a quiet run on ``runner: ray``: a stage that runs on a Ray worker prints its
    stage lines as it would in the run's own process (Ray forwards a worker's stdout to the run's console, each
    line after the task's name and the worker's pid), not Prefect's per-task lines, which still reach the
    Prefect server and its UI."""
    import prefect.main  # noqa: F401  (sets Prefect's logging up now: done later, it would put the console back)
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "uvicorn", "fastapi"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, PrefectConsoleHandler)]
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, StageLines) for h in logger.handlers):
            logger.addHandler(StageLines())


def where_lines(summary: dict, log_path: Path | None) -> list[str]:
    """Where a person looks next: the log, the lake, the MLflow run (the table's last lines name the champion)."""
    run_uri = summary.get("run_uri") or f"{summary['lake']}/runs/{summary['run']}"
    lines = []
    if log_path is not None:
        lines.append(f"log:      {log_path}   (Prefect's per-task lines; --verbose prints them)")
    lines.append(f"lake:     {summary['lake']}   (flywheel inspect {run_uri}; flywheel sql \"SELECT ... FROM scored\")")
    lines.append(f"summary:  {run_uri}/summary.json")
    tracking = summary.get("mlflow") or {}
    if tracking.get("run_id"):
        lines.append(f"mlflow:   {tracking.get('url') or tracking['tracking_uri']}   (run {tracking['run_id']})")
    return lines
