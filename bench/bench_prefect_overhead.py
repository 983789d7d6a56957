"""Prefect's share of one ReST iteration of the demo: the ``rest`` flow against its own body, Prefect-free.

The demo recipe (``recipes/arithmetic-rest.yaml``) with ``grow_steps=1`` is run two ways, on fresh
lakes, run names and registered models:

- **flow**: ``flows.rest.rest`` as ``flywheel run`` calls it: a Prefect flow whose steps are task
  runs (state tracking, parameter validation, input hashing, logs shipped to the API, Grow and score
  shards mapped on the thread task runner, artifacts), on the embedded Prefect server;
- **plain**: the same flow function (``rest.fn``) with every ``@task`` call, ``.submit`` and ``.map``
  running the task's function directly (``task.fn(...)``) and Prefect artifacts dropped: the same
  steps in the same order with no Prefect in the path.

One run is open_run -> inputs -> evaluate + register the starting policy -> Grow -> score ->
thresholds -> filter -> Improve (SFT) -> evaluate -> register -> summary -> publish. Prefect's share =
(flow - plain) / flow; ratio = flow / plain (target: <= 1.1, orchestration costs at most a tenth of
an iteration even on this tiny model, where the work is smallest).

Left out of the timed runs: the demo's warm start (30 epochs on the 200 labelled sums), trained
once and shared as ``model.path`` so neither arm repeats it; creating each arm's MLflow SQLite
database; the embedded Prefect server's startup on a fresh ``PREFECT_HOME`` and the process's first
flow run (a no-op: Prefect's client-side start-up), which a process pays once, not per iteration,
and which are reported on their own. The arms alternate for ``--rounds`` rounds (which goes first
alternates too, so a change in machine load hits both alike) after one untimed warm-up run each,
and each arm's fastest run is compared (other processes only ever add time, so the minimum is the
stable figure on a shared machine; medians are printed too). OpenMP waits passively (see below)
unless ``OMP_WAIT_POLICY`` is set.

Run on a laptop (about 2-3 minutes on 2 cores):   .venv/bin/python bench/bench_prefect_overhead.py
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Before Prefect, MLflow or transformers are imported: a private Prefect home, so the embedded
# server starts from scratch and nothing touches ~/.prefect.
WORKDIR = Path(tempfile.mkdtemp(prefix="bench_prefect_"))
# Registered before the embedded server starts, so it runs after the server's own exit handler.
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)
os.environ["PREFECT_HOME"] = str(WORKDIR / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# The server's usage telemetry races its own first writes on SQLite ("database is locked" noise).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP's default active spin-wait, on a machine whose cores are oversubscribed by other
# processes, made torch 5-10x slower on whichever thread first used OpenMP (measured here), so
# the arms' times depended on which thread ran the torch code rather than on Prefect. Passive
# waiting removes that; export OMP_WAIT_POLICY=active to measure with torch's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow  # noqa: E402

from alignment.recipe import Recipe, load_recipe  # noqa: E402
from flows.rest import rest  # noqa: E402
from tasks.context import RunRef  # noqa: E402
from tasks.inputs import prepare_inputs  # noqa: E402
from tasks.register import configure  # noqa: E402
from tasks.train import warm_start  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.1


class _Done:
    """A finished future: what ``.submit``/``.map`` hand back in the plain arm, where the task already
    ran inline. Like a Prefect future, a failure is raised by ``result()``, not by ``.map`` itself."""

    def __init__(self, fn, *args: Any, **kwargs: Any):
        from prefect.states import Completed, Failed

        self.value, self.error = None, None
        try:
            self.value = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - kept for result(), as Prefect keeps a failed state
            self.error = exc
        # prefect.futures.wait() looks at _final_state; both it and .state are what Prefect would hold.
        self._final_state = self.state = Failed(message=repr(self.error)) if self.error else Completed()

    def result(self, *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def wait(self, *args: Any, **kwargs: Any) -> None:
        return None


def _plain_map(task, *args: Any, return_state: bool = False, wait_for: Any = None, deferred: bool = False, **kwargs: Any):
    """``Task.map`` run inline, expanding its arguments with Prefect's own mapping rules."""
    from prefect.utilities.annotations import BaseAnnotation
    from prefect.utilities.callables import expand_mapping_parameters, get_call_parameters

    calls = expand_mapping_parameters(task.fn, get_call_parameters(task.fn, args, kwargs))
    unwrap = lambda v: v.unwrap() if isinstance(v, BaseAnnotation) else v  # noqa: E731
    return [_Done(task.fn, **{k: unwrap(v) for k, v in call.items()}) for call in calls]


@contextlib.contextmanager
def without_prefect() -> Iterator[None]:
    """Inside, every ``@task`` call runs ``task.fn`` inline and Prefect artifacts are not created."""
    import prefect.artifacts as artifacts
    from prefect.tasks import Task

    saved = {name: getattr(Task, name) for name in ("__call__", "submit", "map")}
    creators = {n: getattr(artifacts, n) for n in dir(artifacts) if n.startswith("create_") and n.endswith("_artifact")}
    Task.__call__ = lambda self, *a, return_state=False, wait_for=None, **k: self.fn(*a, **k)
    Task.submit = lambda self, *a, return_state=False, wait_for=None, **k: _Done(self.fn, *a, **k)
    Task.map = _plain_map
    for name in creators:
        setattr(artifacts, name, lambda *a, **k: None)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Task, name, fn)
        for name, fn in creators.items():
            setattr(artifacts, name, fn)


def run_arm(arm: str, recipe: Recipe, run: str) -> dict:
    """One ``grow_steps=1`` run of the ``rest`` flow, as a flow or as its plain body; returns its summary."""
    if arm == "flow":
        return rest.with_options(flow_run_name=run)(recipe=recipe, run_name=run)
    with without_prefect():
        return rest.fn(recipe=recipe, run_name=run)


def arm_recipe(recipe: Recipe, arm: str, run: str) -> Recipe:
    """The run's recipe: the arm's own lake and MLflow database, a registered model per run."""
    recipe = recipe.model_copy(deep=True)
    recipe.lake = (WORKDIR / f"lake-{arm}").as_uri()
    recipe.mlflow.tracking_uri = f"sqlite:///{WORKDIR / f'mlflow-{arm}' / 'mlflow.db'}"
    recipe.mlflow.model_name = run
    return recipe


def warm_policy(recipe: Recipe) -> str:
    """The demo's warm-started policy, trained once (untimed, no Prefect) and shared by both arms."""
    recipe = arm_recipe(recipe, "setup", "setup")
    ref = RunRef(run="setup", lake=recipe.lake, recipe=recipe, cache_dir=str(WORKDIR / "cache"))
    inputs = prepare_inputs.fn(ref)
    return ref.local_model(warm_start.fn(ref, inputs["base"]))


def start_server() -> float:
    """Start the embedded Prefect server (the singleton its client would start); seconds taken, 0 if configured."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return 0.0
    from prefect.server.api.server import SubprocessASGIServer

    start = time.perf_counter()
    SubprocessASGIServer().start()
    return time.perf_counter() - start


@flow(name="noop")
def noop() -> int:
    return 0


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def quiet() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("mlflow").setLevel(logging.ERROR)


def outcome(summary: dict) -> list[tuple]:
    return [(r["iteration"], r["step"], r["kept"], r["eval_reward"]) for r in summary["iterations"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "arithmetic-rest.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides on top of grow_steps=1")
    parser.add_argument("--rounds", type=int, default=4, help="timed runs per arm, interleaved (fastest is compared)")
    args = parser.parse_args()
    quiet()
    os.chdir(WORKDIR)  # open_run keeps its cache in ./.flywheel

    recipe = load_recipe(args.recipe, ["grow_steps=1", *args.overrides])
    t_warm, policy_dir = timed(warm_policy, recipe)
    recipe = recipe.model_copy(deep=True)
    recipe.model.path = policy_dir
    recipe.warm_start.enabled = False
    for arm in ("plain", "flow"):  # create each arm's MLflow database and experiment, untimed
        configure(RunRef(run="x", lake=recipe.lake, recipe=arm_recipe(recipe, arm, "x"), cache_dir=str(WORKDIR)))

    startup = start_server()
    t_noop_first, _ = timed(noop)  # the process's first flow run: client, flow registration, log workers
    t_noop, _ = timed(noop)
    times: dict[str, list[float]] = {"plain": [], "flow": []}
    outcomes: dict[str, list] = {"plain": [], "flow": []}
    for k in range(args.rounds + 1):
        # Round 0 is an untimed warm-up; then alternate which arm goes first.
        for arm in ("plain", "flow") if k % 2 == 0 else ("flow", "plain"):
            run = f"bench-{arm}-{k}"
            t, summary = timed(run_arm, arm, arm_recipe(recipe, arm, run), run)
            outcomes[arm].append(outcome(summary))
            if k > 0:
                times[arm].append(t)

    t_plain, t_flow = min(times["plain"]), min(times["flow"])
    med_plain, med_flow = statistics.median(times["plain"]), statistics.median(times["flow"])
    share = (t_flow - t_plain) / t_flow
    first = outcomes["plain"][0]
    same = all(o == first for o in outcomes["plain"] + outcomes["flow"])
    fmt = lambda ts: " ".join(f"{t:.2f}" for t in ts)  # noqa: E731

    print(f"\none ReST iteration: {Path(args.recipe).name} with grow_steps=1 ({recipe.task.n_prompts} prompts x "
          f"N={recipe.grow.samples_per_prompt}, {recipe.improve.steps} Improve step), from the demo's warm start")
    print(f"untimed: warm start {t_warm:.1f} s, one warm-up run per arm; {args.rounds} timed runs per arm, interleaved")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average after: {os.getloadavg()[0]:.1f}\n")
    print(f"{'':44}{'fastest s':>10}{'median s':>10}   runs")
    print(f"{'plain (rest.fn, tasks called as task.fn)':44}{t_plain:>10.2f}{med_plain:>10.2f}   {fmt(times['plain'])}")
    print(f"{'Prefect flow (rest, embedded server)':44}{t_flow:>10.2f}{med_flow:>10.2f}   {fmt(times['flow'])}")
    print(f"{'Prefect overhead (flow - plain)':44}{t_flow - t_plain:>10.2f}{med_flow - med_plain:>10.2f}")
    print(f"{'Prefect share (flow - plain) / flow':44}{share:>10.1%}{(med_flow - med_plain) / med_flow:>10.1%}")
    print(f"{'ratio flow / plain':44}{t_flow / t_plain:>10.3f}{med_flow / med_plain:>10.3f}")
    label = "embedded server startup (fresh home)" if startup else "server startup (PREFECT_API_URL set: none)"
    print(f"{label:44}{startup:>10.2f}   (not in the share)")
    print(f"{'first flow run of the process (a no-op)':44}{t_noop_first:>10.2f}   (not in the share)")
    print(f"{'next no-op flow run':44}{t_noop:>10.2f}")
    for it, step, kept, reward in first:
        print(f"iteration {it} step {step}: kept {kept} rows, held-out reward {reward:.3f}")
    print("every run kept the same rows and reached the same held-out reward" if same else
          "WARNING: the runs' kept counts or held-out rewards differ")
    print(json.dumps({
        "bench": "prefect_overhead", "ratio": round(t_flow / t_plain, 3),
        "ratio_means": "flow/plain wall time of a 1-iteration run (fastest of each)", "target": f"<={TARGET}",
        "flow_s": round(t_flow, 2), "plain_s": round(t_plain, 2), "prefect_share": round(share, 4),
        "median_ratio": round(med_flow / med_plain, 3),
        "flow_runs_s": [round(t, 2) for t in times["flow"]], "plain_runs_s": [round(t, 2) for t in times["plain"]],
        "server_startup_s": round(startup, 2), "first_noop_flow_s": round(t_noop_first, 2), "noop_flow_s": round(t_noop, 2), "warm_start_s": round(t_warm, 1),
        "same_results": same, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }))
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
