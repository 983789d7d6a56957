"""Run a training stage's body as N ranks, and wait for them: torchrun on this node, or Ray Train on the run's cluster.

With ``distributed.strategy: ddp`` or ``fsdp``, ``tasks.placement`` hands a training stage's body
``fn(ref, *args)`` (a module-level function over references, like every stage body) to
``run_ranks`` instead of calling it:

- ``launcher: torchrun`` starts ``python -m torch.distributed.run --standalone --nproc-per-node P``
  with this module as the program; each rank joins the process group (``alignment.distributed``),
  calls ``fn(ref, *args)`` and leaves. torchrun watches the ranks: when one dies (an exception, OOM,
  SIGKILL) it stops the others, and every collective gives up after ``distributed.timeout_s``. Each
  rank also follows the process that launched it and stops within a second when that process is gone.
- ``launcher: ray`` runs the same entry as ``ray.train.torch.TorchTrainer`` workers,
  ``processes × nodes`` of them (one GPU each on GPU nodes), on the Ray cluster the run uses
  (``orchestration.ray_address``, ``RAY_ADDRESS``, or the one this process is connected to).

Inside the body only rank 0 writes: it gathers the full state dict, saves one plain Hugging Face
folder and commits it through the lake, so nothing downstream knows how many ranks trained it.
Every rank's output goes to its own log file beside the run's log (``.flywheel/logs/RUN.ranks/``);
a failure is one sentence naming the rank, its exit and that file, after which nothing is committed
and resuming the run trains the stage again.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from alignment import lifeline
from alignment.errors import RunFailure
from alignment.recipe import Recipe

T = TypeVar("T")
PAYLOAD, RESULT = "payload.pkl", "result.pkl"
LOG_ROOT = Path(".flywheel") / "logs"


class RankFailed(RunFailure):
    """A rank of a distributed training stage died; the stage committed nothing."""


def rank_log_dir(run: str, stage: str) -> Path:
    """Where each rank of ``stage`` writes its output, beside the run's log."""
    return (LOG_ROOT / f"{run}.ranks" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def run_ranks(recipe: Recipe, run: str, stage: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in every rank of the recipe's ``distributed`` world; rank 0's return value."""
    d = recipe.distributed
    logs = rank_log_dir(run, stage)
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flywheel-ranks-") as tmp:
        folder = Path(tmp)
        (folder / PAYLOAD).write_bytes(pickle.dumps((fn, args, d.strategy, d.timeout_s)))
        if d.launcher == "ray":
            _ray(folder, logs, d.processes * d.nodes, stage, recipe)
        else:
            _torchrun(folder, logs, d.processes, stage)
        return pickle.loads((folder / RESULT).read_bytes())


def _torchrun(folder: Path, logs: Path, processes: int, stage: str) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(processes), "--max-restarts", "0", "--monitor-interval", "0.5",
        "--log-dir", str(logs / "torchrun"), "--redirects", "3",
        "-m", "tasks.launch", str(folder),
    ]
    # Each rank follows this process (alignment.lifeline): they run in a session of their own, which a Ctrl-C
    # in the terminal does not reach, and nothing else would end them if the run stopped without waiting.
    env = lifeline.launched_env({**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    agent_log = logs / "torchrun.log"
    with open(agent_log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:  # the stage itself is stopped (Ctrl-C, a cancelled flow run): take the ranks with it
            _stop(proc)
            raise
    if code != 0:
        raise RankFailed(_failure(agent_log.read_text(errors="replace"), logs, processes, stage))


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher's whole process group (torchrun forwards it to the ranks), SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def rank_logs(logs: Path, rank: int) -> list[Path]:
    """The files holding ``rank``'s output (torchrun writes ``.../attempt_0/{rank}/stdout.log`` and ``stderr.log``)."""
    return sorted(logs.glob(f"torchrun/**/attempt_*/{rank}/std*.log")) + sorted(logs.glob(f"rank-{rank}.log"))


def _failure(agent_output: str, logs: Path, processes: int, stage: str) -> str:
    """One sentence from torchrun's report: which rank failed first, how, and where its output is."""
    root = agent_output.split("Root Cause", 1)[-1]
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    who = f"rank {rank.group(1)} of {processes}" if rank else f"a rank of {processes}"
    how = _exit_words(int(code.group(1))) if code else "failed"
    files = rank_logs(logs, int(rank.group(1))) if rank else []
    where = next((f for f in files if f.name == "stderr.log"), files[0] if files else logs)
    return (f"the {stage} stage's {who} {how}, so the stage stopped and committed nothing; its output is in {where}. "
            "Fix the cause and run the same command again to resume (the stage trains again).")


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _ray(folder: Path, logs: Path, workers: int, stage: str, recipe: Recipe) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=recipe.orchestration.ray_address or os.environ.get("RAY_ADDRESS") or "auto",
                 log_to_driver=False, include_dashboard=False)
    gpus = (ray.cluster_resources().get("GPU", 0) or 0) >= workers
    trainer = TorchTrainer(
        _ray_rank,
        train_loop_config={"folder": str(folder), "logs": str(logs)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus),
        run_config=RunConfig(name=f"flywheel-{stage}-{folder.name}", storage_path=str(logs / "ray")),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray Train's WorkerGroupError: "[Rank N Error Snippet]:" then the rank's traceback
        text = str(exc)
        rank = re.search(r"\[Rank (\d+)", text)
        last = next((ln.strip() for ln in reversed(text.strip().splitlines()) if ln.strip()), type(exc).__name__)
        who = f"rank {rank.group(1)} of {workers}" if rank else f"a rank of {workers}"
        where = logs / f"rank-{rank.group(1)}.log" if rank else logs
        raise RankFailed(
            f"the {stage} stage's {who} (Ray Train) failed with {last[:200]!r}, so the stage committed nothing; "
            f"its output is in {where}. Fix the cause and run the same command again to resume (the stage trains again)."
        ) from None


def _ray_rank(config: dict[str, str]) -> None:
    """A Ray Train worker: Ray has set up the process group; run the body as this rank."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    log = Path(config["logs"]) / f"rank-{rank}.log"
    _rank_body(Path(config["folder"]), log)


def _rank_body(folder: Path, log: Path | None = None) -> None:
    from alignment import distributed

    fn, args, strategy, timeout_s = pickle.loads((folder / PAYLOAD).read_bytes())
    os.environ["FLYWHEEL_STRATEGY"] = strategy
    if log is not None:  # Ray's worker output stays out of the driver's console: the rank's log takes it
        handle = open(log, "a", buffering=1)  # noqa: SIM115 - the rank's stdout/stderr for its whole life
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    w = distributed.init_process_group(timeout_s)
    result = fn(*args)
    if w.main:
        tmp = folder / f".{RESULT}.{os.getpid()}"
        tmp.write_bytes(pickle.dumps(result))
        tmp.replace(folder / RESULT)
    w.barrier()


def main(argv: list[str]) -> int:
    """torchrun's program: ``python -m tasks.launch FOLDER`` in every rank."""
    import torch.distributed as dist

    lifeline.follow_launcher()
    try:
        _rank_body(Path(argv[0]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
