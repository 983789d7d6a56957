"""Prefect's orchestration cost: per task run, per flow run, and as a share of one sharded ReST iteration.

Every figure is measured against its Prefect-free peer in the same process, timed with
``perf_counter`` *inside* the flow body, so a flow run's own start and teardown (creating the run,
validating parameters, and at the end waiting for its logs and events to flush: from a fraction of a
second to seconds, at random) are kept out of the per-task and per-iteration figures and reported on
their own as a per-run cost, paid once by a run of many iterations.

1. **Per task run.** Inside a flow run, ``--tasks`` no-op task runs that each take the run's
   ``RunRef`` (the recipe ``recipes/arithmetic-rest.yaml``, as every real task gets it), called one
   after another and mapped over the thread task runner four at a time (as Grow and scoring with
   ``grow.shards=4`` are), against the same loops as plain calls (the mapped ones on a thread pool of
   four). Overhead per task run = (task loop - plain loop) / N. The no-op task is made as the real
   tasks are (``tasks.context.flywheel_task``).
2. **One iteration** of the demo recipe with sharded Grow and scoring (``grow.shards=4``: 4 Grow
   shard tasks, 5 score shard tasks, filter, Improve, evaluate, register, publish; the stage commits, the
   thresholds, the step metrics and the summary are plain calls in both arms, as in the flow): the loop body of ``flows/rest.py``
   as a Prefect flow, timed inside the flow from the first task call to the last result, and the same
   steps as plain functions (``task.fn``, shards on a thread pool as wide as the task runner's, Prefect
   artifacts dropped), from the same warm-started policy on fresh lakes and MLflow databases. The flow
   run's wall time seen by its caller minus its body is the per-run cost.

Both arms run as ``flywheel run`` runs them: its embedded Prefect server (``flows.server``, at the
lower CPU priority it gets once it answers) and its console (``flows.console.RunConsole``: one line per
stage on stdout, Prefect's and MLflow's own lines to a log file).

Beside wall time, CPU time is reported: this process's (every thread, so Prefect's log and event
workers too) and the embedded server's, which stores each task run's states, events and logs on the
same cores as the work; before each timed loop or arm the bench waits for the server to go idle, so
one arm's backlog is not timed in the next. The per-task figures are the least of ``--repeats`` flow
runs. After one untimed round of both arms, ``--rounds`` rounds alternate the iteration's arms
(which goes first alternates too). The headline is Prefect's measured share of an iteration, the
median over rounds of (in-flow iteration - plain iteration) / plain: a round's two arms run seconds
apart, so a change in load hits both, whereas the share from each arm's fastest run (also shown)
swung from 4% to 22% between runs on a loaded 2-core machine, where the server's work (most of a
CPU-second per iteration) costs wall time only when it finds no idle core. Beside it: the estimate
from 1 (task runs x per-task overhead / plain), and the shortest iteration in which the
per-iteration overhead stays under the 2% target. The demo's iteration on 2 CPU cores is a few
seconds, so it is above 2% there; an iteration of real size (minutes of sampling and training) is
not. Also reported, and in no share: the embedded server's startup and the process's first flow run
(once per process).

Run on a laptop (about 3-4 minutes on 2 cores):   .venv/bin/python bench/bench_orchestration.py
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before Prefect, MLflow or transformers are imported: a private Prefect home (a fresh embedded server).
WORKDIR = Path(tempfile.mkdtemp(prefix="bench_orchestration_"))
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)  # registered first, so it runs after the server's exit
os.environ["PREFECT_HOME"] = str(WORKDIR / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The server's usage telemetry races its own first writes on SQLite ("database is locked" noise).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP's default busy-wait makes torch on the main thread up to ~18x slower on a busy 2-core
# machine (its second thread is descheduled at every barrier) while worker threads are not hit;
# that would be measured as a difference between the arms that has nothing to do with Prefect.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from prefect import flow, unmapped  # noqa: E402

from alignment.recipe import Recipe, load_recipe  # noqa: E402
from tasks.report.artifacts import publish_iteration  # noqa: E402
from tasks.context import RunRef, flywheel_task  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from flows import server as embedded  # noqa: E402
from flows.console import RunConsole  # noqa: E402
from tasks.filter import filter_stage, thresholds  # noqa: E402
from tasks.grow import commit_samples, grow, grow_shard  # noqa: E402
from tasks.inputs import prepare_inputs  # noqa: E402
from tasks.tracking.registry import log_step_metrics, register, start_tracking  # noqa: E402
from tasks.report.summary import save_summary  # noqa: E402
from tasks.score import commit_scored, score, score_shard  # noqa: E402
from tasks.step_metrics import step_metrics  # noqa: E402
from tasks.train import improve, train_metrics, warm_start  # noqa: E402

from orchestration_report import report  # noqa: E402  (a sibling module: this runs as a script)

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.02
WIDTH = 4  # tasks per map, as in a Grow step with grow.shards=4


def on_threads(fn, calls: list[tuple]) -> list:
    """``fn(*args)`` for each call, all at once on a thread pool: what the thread task runner does."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: fn(*args), calls))


# -- measuring -----------------------------------------------------------------------------------
SERVER: list = []  # the embedded server's process (psutil), once started here


def start_server(stack: contextlib.ExitStack) -> float:
    """Start ``flywheel run``'s embedded Prefect server and point Prefect at it until ``stack`` closes;
    seconds taken, 0 with a configured server (``PREFECT_API_URL``)."""
    import psutil

    start = time.perf_counter()
    server = embedded.start()
    stack.enter_context(embedded.use(server))  # waits until it answers
    if server is None:
        return 0.0
    SERVER.append(psutil.Process(server.process.pid))
    return time.perf_counter() - start


def clock() -> tuple[float, float, float]:
    """Seconds so far: wall, this process's CPU (all threads), the embedded server's CPU (0 without one)."""
    server = sum(SERVER[0].cpu_times()[:2]) if SERVER else 0.0
    return time.perf_counter(), time.process_time(), server


def settle(limit_s: float = 30.0) -> None:
    """Wait (up to ``limit_s``) for the embedded server to go idle, so one arm's backlog is not timed in the next."""
    end = time.perf_counter() + limit_s
    while SERVER and time.perf_counter() < end:
        before = clock()[2]
        time.sleep(0.5)
        if clock()[2] - before < 0.05:
            return


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


# -- 1. per task run, timed inside a flow ---------------------------------------------------------
def work(ref: RunRef, x: int) -> int:
    return x + 1


noop = flywheel_task(name="noop")(work)  # made as the real tasks are (no result cache, the RunRef quoted)

LOOPS = {
    "plain": lambda ref, n: [work(ref, i) for i in range(n)],
    "called": lambda ref, n: [noop(ref, i) for i in range(n)],
    "plain_threads": lambda ref, n: [y for s in range(0, n, WIDTH)
                                     for y in on_threads(work, [(ref, i) for i in range(s, min(n, s + WIDTH))])],
    "mapped": lambda ref, n: [f.result() for s in range(0, n, WIDTH)
                              for f in noop.map(unmapped(ref), range(s, min(n, s + WIDTH)))],
}


@flow(name="per-task-probe")
def probe(ref: RunRef, n: int, reverse: bool) -> dict[str, list[float]]:
    """Each loop of ``LOOPS`` inside this flow run: [wall, this process's CPU, server CPU till it is idle] seconds."""
    spent = {}
    for name in reversed(LOOPS) if reverse else LOOPS:
        settle()
        start = clock()
        LOOPS[name](ref, n)
        wall, cpu, _ = (b - a for a, b in zip(start, clock()))
        settle()  # the server stores the runs' states, events and logs after the loop too
        spent[name] = [wall, cpu, clock()[2] - start[2]]
    return spent


def per_task(ref: RunRef, n: int, repeats: int) -> dict[str, list[float]]:
    """Each loop's least [wall, CPU, server CPU] of ``repeats`` flow runs, and the overhead per task run of the
    called and mapped loops over their plain ones."""
    best = {name: [float("inf")] * 3 for name in LOOPS}
    for r in range(repeats):
        for name, spent in probe(ref, n, r % 2 == 1).items():
            best[name] = [min(x, y) for x, y in zip(best[name], spent)]
    per = lambda ours, peer: [(x - y) / n for x, y in zip(best[ours], best[peer])]  # noqa: E731
    return {**best, "called_per_task": per("called", "plain"), "mapped_per_task": per("mapped", "plain_threads")}


# -- 2. one sharded iteration ---------------------------------------------------------------------
def plain_grow(ref: RunRef, model_uri: str, iteration: int) -> str:
    """``tasks.grow.grow`` with its tasks as plain functions, the shards on threads."""
    n = ref.recipe.grow.shards
    parts = on_threads(grow_shard.fn, [(ref, model_uri, iteration, s, n) for s in range(n)])
    return commit_samples(ref, model_uri, iteration, parts)


def plain_score(ref: RunRef, samples_uri: str, iteration: int) -> str:
    """``tasks.score.score`` with its tasks as plain functions, the parts on threads."""
    names = [f["name"] for f in ref.open_lake().manifest(samples_uri).files]
    parts = on_threads(score_shard.fn, [(ref, samples_uri, iteration, name, i) for i, name in enumerate(names)])
    return commit_scored(ref, samples_uri, iteration, parts)


@contextlib.contextmanager
def without_artifacts() -> Iterator[None]:
    """Prefect artifacts are Prefect's cost: the plain arm's ``publish_iteration.fn`` makes none."""
    import prefect.artifacts as artifacts

    saved = {n: getattr(artifacts, n) for n in dir(artifacts) if n.startswith("create_") and n.endswith("_artifact")}
    for name in saved:
        setattr(artifacts, name, lambda *a, **k: None)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(artifacts, name, fn)


STEP_TIMES: dict[str, dict[str, float]] = {"plain": {}, "flow": {}}


def steps(plain: bool) -> SimpleNamespace:
    """The iteration's steps (the Prefect tasks, or their plain functions), each timed into STEP_TIMES."""
    pick = (lambda t: t.fn) if plain else (lambda t: t)
    chosen = dict(
        grow=plain_grow if plain else grow, score=plain_score if plain else score,
        thresholds=thresholds, filter=pick(filter_stage), improve=pick(improve), evaluate=pick(evaluate),
        step_metrics=step_metrics, register=pick(register), save_summary=save_summary,  # plain calls in the flow too
        publish=pick(publish_iteration),
    )
    times = STEP_TIMES["plain" if plain else "flow"]
    times.clear()

    def timed_step(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - start
        return call

    return SimpleNamespace(times=times, **{name: timed_step(name, fn) for name, fn in chosen.items()})


def iteration(ref: RunRef, policy: str, version: str, g: int, s: SimpleNamespace) -> tuple[list[dict], list[float]]:
    """The loop body of ``flows/rest.py`` for one Grow step and its Improve steps; (rows, seconds spent as ``clock``)."""
    start = clock()
    scored = s.score(ref, s.grow(ref, policy, g), g)
    rows = []
    for i, tau in enumerate(s.thresholds(ref, scored), start=1):
        kept = s.filter(ref, scored, g, i, tau)
        if kept.kept == 0:
            continue
        candidate = s.improve(ref, policy, kept.uri, g, i)
        metrics = s.evaluate(ref, candidate, g, i)
        datasets = [kept.uri, ref.stage_uri(g, "eval", i)]
        seconds = {f"seconds_{k}": v for k, v in s.times.items()}  # as tasks.step_metrics.Stopwatch names them
        extra = s.step_metrics(ref, scored, kept.uri, datasets[1], ref.stage_uri(0, "eval", 0), seconds)
        reg = s.register(ref, candidate, metrics, g, i, datasets, parent_version=version,
                         step_metrics={"tau": tau or 0.0, "kept": kept.kept, **train_metrics(ref, candidate), **extra})
        log_step_metrics(ref, g, i, {"seconds_register": s.times["register"]})
        # A summary row as tasks.report.summary.Summary writes it.
        # Timings differ between the arms by design; every other figure must be the same.
        figures = {k: v for k, v in {**metrics, **extra}.items() if not k.startswith(("seconds_", "grow_samples", "grow_tokens"))}
        rows.append({"iteration": g, "step": i, "tau": tau, "kept": kept.kept, **figures, "model_version": reg.model_version})
        s.save_summary(ref, {"run": ref.run, "algorithm": "rest", "lake": ref.lake, "iterations": rows})
        s.publish(ref, g, scored, kept.uri)
    return rows, [b - a for a, b in zip(start, clock())]


@flow(name="rest-iteration", log_prints=True)  # rest's own flow options
def iteration_flow(ref: RunRef, policy: str, version: str, g: int) -> tuple[list[dict], list[float], str]:
    from prefect.runtime import flow_run

    rows, spent = iteration(ref, policy, version, g, steps(plain=False))
    return rows, spent, str(flow_run.id)


def run_arm(arm: str, ref: RunRef, policy: str, version: str) -> tuple[list[dict], list[float], float, str | None]:
    """One iteration as ``arm``: (rows, the body's ``clock`` seconds, wall seconds the caller waited, flow run id)."""
    settle()
    start = time.perf_counter()
    if arm == "plain":
        with without_artifacts():
            rows, body = iteration(ref, policy, version, 1, steps(plain=True))
        flow_run_id = None
    else:
        rows, body, flow_run_id = iteration_flow(ref, policy, version, 1)
    return rows, body, time.perf_counter() - start, flow_run_id


def task_run_counts(flow_run_id: str) -> tuple[int, int]:
    """(called, mapped) task runs of a flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
    mapped_runs = sum(r.name.startswith(("grow-shard", "score-shard")) for r in runs)
    return len(runs) - mapped_runs, mapped_runs


def make_ref(recipe: Recipe, arm: str) -> RunRef:
    recipe = recipe.model_copy(deep=True)
    recipe.lake = (WORKDIR / f"lake-{arm}").as_uri()
    recipe.mlflow.tracking_uri = f"sqlite:///{WORKDIR / f'mlflow-{arm}' / 'mlflow.db'}"
    return RunRef(run=f"bench-{arm}", lake=recipe.lake, recipe=recipe, cache_dir=str(WORKDIR / "cache"))


def prepare_arm(recipe: Recipe, arm: str) -> tuple[RunRef, str, str]:
    """Untimed: MLflow parent run, inputs, and the starting policy evaluated and registered."""
    ref = make_ref(recipe, arm)
    ref = ref.model_copy(update={"mlflow_run_id": start_tracking.fn(ref)})
    policy = prepare_inputs.fn(ref)["base"]
    metrics = evaluate.fn(ref, policy, 0, 0)
    reg = register.fn(ref, policy, metrics, 0, 0, [ref.stage_uri(0, "labelled"), ref.stage_uri(0, "eval", 0)])
    return ref, policy, reg.model_version


def quiet() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("mlflow").setLevel(logging.ERROR)


@flow(name="empty")
def empty() -> None:
    """A flow run that does nothing: the process's first one pays Prefect's client start-up."""


def iterations(recipe: Recipe, rounds: int) -> dict:
    """One warm-up round, then ``rounds`` alternating rounds of both arms of one iteration."""
    out: dict = {"body": {"plain": [], "flow": []}, "cpu": {}, "per_run": [], "rows": {}, "steps": {}}
    for r in range(rounds + 1):  # round 0 warms up both arms (first imports, matplotlib's font cache)
        for arm in ("plain", "flow") if r % 2 == 0 else ("flow", "plain"):  # neither arm always goes first
            ref, policy, version = prepare_arm(recipe, f"{arm}-{r}")  # untimed: fresh lake and MLflow db
            out["rows"][arm], (t_body, *cpu), t_wall, run_id = run_arm(arm, ref, policy, version)
            if r == 0:
                continue
            if not out["body"][arm] or t_body < min(out["body"][arm]):
                out["steps"][arm] = dict(STEP_TIMES[arm])
            out["body"][arm].append(t_body)
            out["cpu"][arm] = [min(x, y) for x, y in zip(out["cpu"].get(arm, cpu), cpu)]
            if run_id is not None:
                out["per_run"].append(t_wall - t_body)
                out["flow_run_id"] = run_id
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "arithmetic-rest.yaml"))
    parser.add_argument("--tasks", type=int, default=200, help="no-op task runs per loop for the per-task measurement")
    parser.add_argument("--repeats", type=int, default=4, help="flow runs of the per-task loops; the least counts")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of the iteration's arms; the median counts")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides on top of grow_steps=1 grow.shards=4")
    args = parser.parse_args()
    quiet()
    os.chdir(WORKDIR)
    recipe = load_recipe(args.recipe, ["grow_steps=1", "grow.shards=4", *args.overrides])
    with contextlib.ExitStack() as stack:
        console = RunConsole(WORKDIR / "run.log", verbose=False).open()  # as flywheel run prints
        stack.callback(console.close)
        measure(args, recipe, stack)


def measure(args: argparse.Namespace, recipe: Recipe, stack: contextlib.ExitStack) -> None:
    once = {"server_startup_s": start_server(stack), "first_flow_run_s": timed(empty)[0]}
    probe(make_ref(recipe, "probe"), 5, False)  # untimed: the loops' first calls
    per = per_task(make_ref(recipe, "probe"), args.tasks, args.repeats)

    t0, setup_ref = time.perf_counter(), make_ref(recipe, "setup")
    policy_dir = setup_ref.local_model(warm_start.fn(setup_ref, prepare_inputs.fn(setup_ref)["base"]))
    once["warm_start_s"] = time.perf_counter() - t0
    recipe = recipe.model_copy(deep=True)
    recipe.model.path, recipe.warm_start.enabled = policy_dir, False
    it = iterations(recipe, args.rounds)
    result = report(args, recipe, per, it, once, task_runs=task_run_counts(it["flow_run_id"]), target=TARGET, width=WIDTH)
    print(json.dumps(result))
    if not result["same_results"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
