"""The same seeded run on the thread runner and on a local Ray cluster writes the same datasets.

Grow and scoring are mapped over prompt shards on the flow's task runner; ``orchestration.runner:
ray`` puts those shards on Ray workers (other processes, other torch thread counts). Samples are
seeded per (prompt, sample index), so ``samples``, ``scored`` and ``filtered`` must be equal row
for row. A real local Ray cluster (``ray.init(num_cpus=2)``), the embedded Prefect server, a local
lake: nothing is mocked. The Ray tests are ``slow`` (starting Ray and importing torch in its workers
takes most of a minute on 2 cores) and skipped only when Ray or prefect-ray is not installed
(``pip install -e '.[ray]'``); the default tier checks the property they rest on without Ray: the
shard count does not change the data.
"""

from __future__ import annotations

import pytest
from prefect import flow

from alignment.recipe import Recipe
from flows import server as embedded
from flows.run import task_runner
from tasks.context import RunRef
from tasks.filter import filter_stage, thresholds
from tasks.grow import grow
from tasks.inputs import prepare_inputs
from tasks.lake import Lake
from tasks.score import score

STAGES = [("samples", None), ("scored", None), ("filtered", 1)]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU Ray cluster for the module; the task runner uses it instead of starting one."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    pytest.importorskip("prefect_ray", reason="prefect-ray is not installed: pip install -e '.[ray]'")
    if ray.is_initialized():
        ray.shutdown()
    # One GPU declared (none is needed: Ray only counts it), so shards that ask for GPUs are placed and
    # given CUDA_VISIBLE_DEVICES as on a GPU node; torch still finds no CUDA device and samples on CPU.
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@flow(name="grow-score-filter", validate_parameters=False)
def grow_score_filter(ref: RunRef) -> None:
    """One Grow step's data path of flows/rest.py: Grow (sharded) -> score (sharded) -> filter."""
    inputs = prepare_inputs(ref)
    scored = score(ref, grow(ref, inputs["base"], 1), 1)
    filter_stage(ref, scored, 1, 1, thresholds(ref, scored)[0])


def _recipe(lake: str, runner: str, **extra) -> Recipe:
    return Recipe.model_validate({
        "name": "ray-vs-thread", "seed": 3, "lake": lake, "grow_steps": 1,
        "task": {"n_labelled": 40, "n_prompts": 40, "n_eval": 20},
        "grow": {"samples_per_prompt": 3, "shards": 3, "max_new_tokens": 5, "batch_size": 16},
        "orchestration": {"runner": runner}, **extra,
    })


def _frames(lake_uri: str, run: str) -> dict[str, list[dict]]:
    lake = Lake(lake_uri)
    return {stage: lake.read(lake.stage_uri(run, 1, stage, step)).to_dicts() for stage, step in STAGES}


def _run_data_path(workdir, name: str, runner: str, tiny_model_dir, orchestration=None, logs=None, **grow):
    recipe = _recipe((workdir / f"lake-{name}").as_uri(), runner, model={"path": str(tiny_model_dir)},
                     warm_start={"enabled": False})
    recipe.grow = recipe.grow.model_copy(update=grow)
    recipe.orchestration = recipe.orchestration.model_copy(update=orchestration or {})
    ref = RunRef(run="r", lake=recipe.lake, recipe=recipe, cache_dir=str(workdir / "cache"))
    chosen = task_runner(recipe)
    assert (chosen is None) == (runner == "thread")
    with embedded.use(embedded.start()):  # as flywheel run does: one API for the flow and Ray's workers
        state = (grow_score_filter if chosen is None else grow_score_filter.with_options(task_runner=chosen))(ref, return_state=True)
        assert state.is_completed(), state
        if logs is not None:
            logs.extend(_grow_log_lines(state.state_details.flow_run_id))
    return _frames(recipe.lake, "r")


def _grow_log_lines(flow_run_id) -> list[str]:
    """The Grow shards' log lines of a flow run, read back from the Prefect API (they arrive in batches)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        for _ in range(40):
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
            lines = [log.message for log in logs if log.message.startswith("grow g=") and " shard " in log.message]
            if len(lines) >= 3:
                return lines
            time.sleep(0.5)
    return lines


def test_shard_count_does_not_change_the_data(workdir, tiny_model_dir):
    """Fast, no Ray: 1 shard or 3 shards on the thread runner give the same rows (seeded per prompt and sample)."""
    one = _run_data_path(workdir, "one", "thread", tiny_model_dir, shards=1)
    three = _run_data_path(workdir, "three", "thread", tiny_model_dir, shards=3)
    lake = Lake((workdir / "lake-three").as_uri())
    assert len(lake.manifest(lake.stage_uri("r", 1, "scored")).files) == 4  # three Grow shards + labelled, scored per part
    key = lambda row: (row["prompt_id"], row["sample_idx"])  # shards interleave prompts: compare as sets of rows
    for stage, _ in STAGES:
        assert one[stage] and sorted(one[stage], key=key) == sorted(three[stage], key=key), stage


def test_runner_choice():
    RayTaskRunner = pytest.importorskip("prefect_ray.task_runners").RayTaskRunner

    assert task_runner(_recipe("file:///tmp/x", "thread")) is None
    ray_runner = task_runner(Recipe.model_validate({"name": "r", "orchestration": {"runner": "ray", "ray_address": "ray://head:10001"}}))
    assert isinstance(ray_runner, RayTaskRunner) and ray_runner.address == "ray://head:10001"


@pytest.mark.slow
def test_sharded_grow_and_score_identical_on_ray(ray_cluster, workdir, tiny_model_dir):
    """Grow -> score -> filter with 3 shards on threads and on a local Ray cluster: equal row for row.

    On Ray each Grow shard asks for half a GPU (``ray_gpus_per_stage``), so Ray places it on the GPU
    and says which one: every shard's log line names GPU 0.
    """
    logs: list[str] = []
    out = {"thread": _run_data_path(workdir, "thread", "thread", tiny_model_dir),
           "ray": _run_data_path(workdir, "ray", "ray", tiny_model_dir, orchestration={"ray_gpus_per_stage": 0.5}, logs=logs)}
    assert sorted(line.split(":")[0] for line in logs) == [f"grow g=1 shard {i}/3 on GPU 0" for i in (1, 2, 3)], logs
    for stage, _ in STAGES:
        assert out["ray"][stage], f"{stage} is empty"
        assert out["ray"][stage] == out["thread"][stage], f"{stage} differs between the thread and Ray runners"


@pytest.mark.slow
def test_seeded_flow_run_identical_on_ray(ray_cluster, workdir):
    """The whole ReST flow (warm start, Grow, score, filter, Improve, evaluate, register), both runners."""
    from flows.run import run_recipe

    out = {}
    for runner in ("thread", "ray"):
        recipe = _recipe((workdir / f"lake-{runner}").as_uri(), runner, warm_start={"epochs": 5},
                         mlflow={"tracking_uri": f"sqlite:///{workdir / runner / 'mlflow.db'}"})
        summary = run_recipe(recipe, run_name="seeded")
        assert summary["iterations"], summary
        out[runner] = _frames(recipe.lake, "seeded")
    for stage, _ in STAGES:
        assert out["ray"][stage] == out["thread"][stage], f"{stage} differs between the thread and Ray runners"


def _ray_below(root: int) -> dict[int, str]:
    """The Ray processes below ``root`` (``alignment.lifeline.descendants``), with their command lines."""
    from pathlib import Path

    from alignment import lifeline

    found = {}
    for pid in lifeline.descendants(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "ray" in command.lower():
            found[pid] = command
    return found


@pytest.mark.slow
def test_a_stopped_run_stops_the_ray_cluster_it_started(tmp_path):
    """``flywheel run`` with ``runner: ray`` and no address starts a local Ray; Ctrl-C stops the run in order and
    Ray with it, its dashboard and runtime-env agents included (the process's exit alone leaves those behind)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("prefect_ray", reason="prefect-ray is not installed: pip install -e '.[ray]'")
    from tests.flywheel_helpers import FAST, RECIPE, ROOT

    cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", "stopped",
           *[a for s in [*FAST, "orchestration.runner=ray"] for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline, ray = time.monotonic() + 300, {}
        while time.monotonic() < deadline and proc.poll() is None and not any("RuntimeEnvAgent" in c for c in ray.values()):
            ray = _ray_below(proc.pid)
            time.sleep(0.5)
        assert any("raylet" in c for c in ray.values()), ray
        time.sleep(2)
        ray = _ray_below(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "flywheel: stopped by SIGINT" in err and "Traceback" not in err
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(ray):
        time.sleep(0.2)
    assert not _alive(ray), _alive(ray)


@pytest.mark.slow
def test_a_killed_run_leaves_no_ray_process(tmp_path):
    """SIGKILL leaves a run no time to stop its local Ray cluster: Ray's own processes die with it, and the reaper
    the run started kills the dashboard and runtime-env agents they leave (alone, they linger about a minute)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("prefect_ray", reason="prefect-ray is not installed: pip install -e '.[ray]'")
    from tests.flywheel_helpers import FAST, RECIPE, ROOT

    cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", "killed",
           *[a for s in [*FAST, "orchestration.runner=ray"] for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    ray: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not any("RuntimeEnvAgent" in c for c in ray.values()):
            ray = _ray_below(proc.pid)
            time.sleep(0.5)
        time.sleep(2)
        ray = _ray_below(proc.pid)
        assert any("DashboardAgent" in c for c in ray.values()) and any("RuntimeEnvAgent" in c for c in ray.values()), ray
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(ray):
            time.sleep(0.2)
        assert not _alive(ray), _alive(ray)
    finally:
        for pid in _alive(ray):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _alive(procs: dict[int, str]) -> dict[int, str]:
    from alignment import lifeline

    return {pid: c[:80] for pid, c in procs.items() if lifeline.running(pid)}


@pytest.mark.slow
def test_a_ray_run_prints_stage_lines_and_not_prefects_or_rays(tmp_path):
    """``flywheel run`` with ``runner: ray``: the stages that run on Ray workers print the same stage lines as on
    threads (after Ray's ``(task pid=…)`` prefix, uncoloured when the console is not a terminal), not Prefect's
    per-task lines; Ray's own startup lines go to the run's log. The console is as quiet as a thread run's."""
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("prefect_ray", reason="prefect-ray is not installed: pip install -e '.[ray]'")
    from tests.flywheel_helpers import FAST, RECIPE, ROOT

    sets = [*FAST, "grow_steps=1", "orchestration.runner=ray"]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", "on-ray",
                          *[a for s in sets for a in ("--set", s)]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^\(grow-shard pid=\d+\) grow g=1 shard 1/1: 60 prompts -> 240 samples · ", out.stdout, re.M), out.stdout
    assert re.search(r"^\(score-shard pid=\d+\) score g=1 part ", out.stdout, re.M), out.stdout
    assert "Finished in state" not in out.stdout + out.stderr and "\x1b" not in out.stdout + out.stderr
    assert out.stderr == "", out.stderr[-3000:]
    log = (tmp_path / ".flywheel" / "logs" / "on-ray.log").read_text()
    assert "Started a local Ray instance" in log
