"""Run a recipe with the flow its ``algorithm`` names, on the task runner its ``orchestration`` names.

``orchestration.runner: thread`` (the default) runs Grow and scoring shards on the flow's thread
pool; ``ray`` runs them on a Ray cluster through prefect-ray's ``RayTaskRunner``: the one at
``orchestration.ray_address`` (``ray://head:10001``, or ``auto`` for the node's cluster), else a
local one started for the run (or the one this process already ``ray.init``-ed). Samples are
seeded per (prompt, sample), so a seeded run writes the same datasets whichever runner it uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from alignment.recipe import Recipe


def check_lake(recipe: Recipe) -> None:
    """One cheap request to the lake before the flow starts.

    Wrong credentials, a missing bucket or a stopped S3 server then fail as one ``LakeAccessError``
    sentence, before Prefect starts, logs a failed flow run, or anything is written.
    """
    from tasks.lake import MANIFEST, Lake

    lake = Lake(recipe.lake, recipe.s3.model_dump(exclude_none=True))
    bucket_only = lake.uri.startswith("s3://") and "/" not in lake.uri[len("s3://"):]
    lake.store.exists(f"{lake.uri}/{MANIFEST}" if bucket_only else lake.uri)


def run_recipe(recipe: Recipe, run_name: str | None = None) -> dict[str, Any]:
    """Run the recipe's flow as run ``run_name`` (a new name starts a run, a used one resumes it).

    Before Prefect runs anything, cheapest first: the names are checked, the lake answers, the task's
    files and rewards pass ``tasks.preflight.check_inputs``, and the run is neither held by another
    process nor resumed with a changed recipe (``precheck_run``); then the embedded Prefect server starts
    in the background (``flows.server``) while the model is checked against the prompts, this process
    takes the run's lease (one writer per run), the recipe is checked against the one the run was
    created with, and the flows load. Each failure is one ``UserError`` sentence, and a mistake costs
    seconds, not the import of every model library. The lease is released when the flow ends.
    """
    from alignment.progress import progress_seconds
    from flows import server as embedded
    from tasks.placement import check_stage_deployments
    from tasks.preflight import check_inputs, check_model
    from tasks.lake import check_names, default_run_name, guard_run, precheck_run, release

    name = run_name or default_run_name(recipe)
    check_names(recipe, name)  # the run and model names, before anything touches the lake
    progress_seconds()  # a bad $FLYWHEEL_PROGRESS_SECONDS is one sentence now, not a failed training stage
    check_lake(recipe)
    check_stage_deployments(recipe)
    data = check_inputs(recipe)
    precheck_run(recipe, name)  # another writer, or a changed recipe on resume
    server = embedded.start()
    try:
        check_model(recipe, data)
        lake, taken = guard_run(recipe, name)
    except BaseException:
        if server is not None and not server.ready:
            server.kill()  # started for this run, which ends before it used it
        raise
    try:
        flow = flow_for(recipe).with_options(flow_run_name=name)
        with stop_on_signals(lake.uri, name), user_errors_without_tracebacks(), embedded.use(server):
            try:
                return flow(recipe=recipe, run_name=name)
            except Exception as exc:  # the run's work has started: what failed, where, and how to resume
                from flows.errors import stopped

                failure = stopped(exc, name, recipe.mlflow.tracking_uri)
                if failure is None:
                    raise
                raise failure from exc
    finally:
        if taken:
            release(lake.uri, name)


class _NoUserErrorTracebacks(logging.Filter):
    """Drop Prefect's log records that carry a ``UserError`` or ``RunFailure`` from the console: the CLI says it
    in one sentence instead. The run's log file keeps them, tracebacks and all."""

    def filter(self, record: logging.LogRecord) -> bool:
        from alignment.errors import RunFailure, UserError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (UserError, RunFailure))


@contextlib.contextmanager
def user_errors_without_tracebacks() -> Iterator[None]:
    """While the flow runs, a mistake that is the user's to fix (raised in a task or the flow) prints no
    Prefect traceback: the task and flow engines log it with its traceback, the CLI prints its sentence.
    Files (the run's log) keep the traceback."""
    quiet = _NoUserErrorTracebacks()
    handlers = {h for name in ("", "prefect") for h in logging.getLogger(name).handlers if not isinstance(h, logging.FileHandler)}
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


@contextlib.contextmanager
def stop_on_signals(lake_uri: str, run: str, grace_s: float = 5.0) -> Iterator[None]:
    """Ctrl-C or SIGTERM stops the run within seconds, leaving it resumable, with one line saying how.

    A stage is committed only by its manifest and every write is atomic, so stopping mid-stage is
    what a SIGKILL would do (the resumed run replaces the unfinished stage); but here the lease is
    released first, so the same command with the same ``--run-name`` resumes at once. Prefect's
    embedded server and a local Ray cluster are given ``grace_s`` seconds to stop, then whatever this
    process started that still runs is killed; a second signal exits immediately.
    """
    import signal
    import threading

    from alignment import lifeline

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def stop(signum: int, frame: Any) -> None:
        code = 128 + signum
        if stopping.is_set():
            os._exit(code)
        stopping.set()
        sys.stderr.write(
            f"flywheel: stopped by {signal.Signals(signum).name}; run {run!r} keeps every stage it committed: "
            f"resume it with the same recipe and --run-name {run}.\n"
        )
        sys.stderr.flush()
        # Nothing else is printed while the process winds down: threads that lose their connections
        # (Prefect's server, MLflow's SQLite pool) would otherwise log tracebacks after the one line.
        quiet = os.open(os.devnull, os.O_WRONLY)
        sys.stdout.flush()
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        spawned = lifeline.descendants()  # the embedded server, a local Ray cluster and its agents, training ranks
        closer = threading.Thread(target=_close_quietly, args=(lake_uri, run), daemon=True)
        closer.start()
        closer.join(grace_s)
        for pid in filter(lifeline.running, spawned):  # what did not stop in time or ignored SIGTERM (Ray's agents)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(code)

    stopping = threading.Event()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _close_quietly(lake_uri: str, run: str) -> None:
    """Release the run's lease and stop this process's embedded Prefect server and the local Ray cluster it
    started (``orchestration.runner: ray`` without an address), saying nothing."""
    import logging

    from tasks.lake import release

    logging.disable(logging.CRITICAL)
    try:
        release(lake_uri, run)
        from flows import server as embedded

        embedded.kill()
        _stop_local_ray()
        if "prefect.server.api.server" not in sys.modules:
            return
        from prefect.server.api.server import SubprocessASGIServer

        if SubprocessASGIServer._instances:  # only one this process started
            for server in list(SubprocessASGIServer._instances.values()):
                # Killed, not terminated: a terminated server flushes its event services and logs
                # their cancellation tracebacks on the terminal it shares with this process.
                if server.server_process is not None:
                    server.server_process.kill()
                    server.server_process.wait(timeout=5)
                server.stop()
    except Exception:
        pass


def _stop_local_ray() -> None:
    """Shut Ray down as the process's exit would (os._exit skips it): a cluster this process started is stopped, one
    it only connected to is left running. What of it outlives the stop's grace period (its dashboard and runtime-env
    agents do not always heed SIGTERM) is killed with the rest of the run's descendants by ``stop_on_signals``."""
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()


def starts_local_ray(recipe: Recipe) -> bool:
    """Whether the run starts a Ray cluster of its own: ``runner: ray`` with no address, here or in ``RAY_ADDRESS``."""
    orch = recipe.orchestration
    return orch.runner == "ray" and not orch.ray_address and not os.environ.get("RAY_ADDRESS")


def flow_for(recipe: Recipe):
    """The recipe's flow (``rest``, ``iterative_dpo`` or ``grpo``) with the recipe's task runner."""
    if recipe.algorithm == "rest":
        from flows.rest import rest as flow
    elif recipe.algorithm == "iterative_dpo":
        from flows.iterative_dpo import iterative_dpo as flow
    else:
        from flows.grpo import grpo as flow
    runner = task_runner(recipe)
    return flow if runner is None else flow.with_options(task_runner=runner)


def task_runner(recipe: Recipe):
    """A ``RayTaskRunner`` for ``runner: ray``; ``None`` keeps the flow's thread pool."""
    orch = recipe.orchestration
    if orch.runner == "thread":
        return None
    try:
        from prefect_ray.task_runners import RayTaskRunner
    except ImportError as exc:
        from alignment.recipe import RecipeError

        raise RecipeError(
            "orchestration.runner is 'ray' but prefect-ray is not installed: pip install -e '.[ray]'."
        ) from exc
    from flows import console

    # A local cluster started for the run needs no dashboard; a remote one keeps its own settings.
    init = {} if orch.ray_address else {"include_dashboard": False}
    if console.quiet():  # workers print stage lines, not Prefect's; Ray's own startup lines go to the run's log
        init["runtime_env"] = {"worker_process_setup_hook": "flows.console.ray_worker_lines"}
        import ray

        ray.is_initialized()  # prefect-ray imports Ray lazily: loading it now puts Ray's own handler on its logger
        console.to_run_log("ray")
        if not sys.stdout.isatty():
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours the "(task pid=…)" prefix of workers' lines
    return RayTaskRunner(address=orch.ray_address, init_kwargs=init)
