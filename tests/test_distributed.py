"""Training on several processes gives what one process gives: FSDP2 and DDP on CPU with gloo, 2 ranks.

The ranks are started the way a training stage starts them (``tasks.launch.run_ranks``: torchrun, one
node) and run the one training loop (``alignment.training.train_loop``) on the tiny Llama. At the same
global batch, world size 2 must give world size 1's per-step losses and final weights, for SFT, for
DPO and for GRPO, including the last, shorter step of an epoch in which one rank has no unit at all.

Tolerances: the ranks add the same per-micro-batch gradients in a different order (an all-reduce or
reduce-scatter of two halves instead of one accumulation), so float32 sums differ in the last bits.
The losses must agree to 1e-5 relative (seen: 2e-8). AdamW divides each gradient by its own running
scale, so a weight whose gradient is nearly zero turns rounding noise into a visible step: the weights
must agree to 1e-5 absolute (seen: 2e-6 after 3 steps at lr 1e-3) and the whole difference must stay
below 1e-5 of the whole update (seen: 2e-6). A wrong split (a unit counted twice, a share weighted
wrongly, gradients summed instead of averaged) moves the losses by percent, far outside either.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from alignment.arithmetic import arithmetic_task
from tasks.launch import RankFailed, run_ranks
from tests import distributed_bodies as bodies

ROOT = Path(__file__).resolve().parents[1]
# 17 examples, steps of 8: the last step holds one unit, so rank 1 has none and joins with weight 0.
# Micro-batches of 2 in one process are the same chunks the ranks take, so the losses can agree.
SETTINGS = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "micro_batch_size": 2, "warmup_steps": 0, "seed": 0}


def _world(strategy: str, processes: int = 2, timeout_s: float = 60.0):
    return SimpleNamespace(
        distributed=SimpleNamespace(strategy=strategy, processes=processes, nodes=1, launcher="torchrun", timeout_s=timeout_s),
        orchestration=SimpleNamespace(ray_address=None),
    )


@pytest.fixture
def ranks_env(workdir, monkeypatch):
    """Ranks import these bodies by name (``tests.distributed_bodies``) from the repository root."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return workdir


@pytest.fixture(scope="module")
def data():
    task = arithmetic_task()
    labelled = task.labelled.head(17)
    return labelled["prompt"].to_list(), labelled["completion"].to_list()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same(one: tuple[list[float], Path], two: tuple[list[float], Path], start: Path) -> None:
    (losses1, dir1), (losses2, dir2) = one, two
    assert len(losses1) == len(losses2) >= 3
    assert losses1 == pytest.approx(losses2, rel=1e-5), (losses1, losses2)
    w1, w2, before = _weights(dir1), _weights(dir2), _weights(start)
    assert w1.keys() == w2.keys()
    moved = torch.cat([(w1[n] - before[n]).flatten() for n in w1]).norm()
    apart = torch.cat([(w1[n] - w2[n]).flatten() for n in w1]).norm()
    assert moved > 1e-2  # both trained: equal because they trained alike, not because neither did
    assert apart <= 1e-5 * moved, (apart, moved)  # seen: 2e-6 of the update (SFT 5e-7)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5, rtol=0), name  # seen: at most 2e-6


LORA = {"lora_r": 4, "gradient_checkpointing": True, "lr": 1e-2}
GRPO = {**SETTINGS, "epochs": 2, "lr": 1e-2}  # 17 groups, 8 per update: 3 updates an epoch, the last of one group


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model_dir, data):
    """Each case trained in one process and on 2 ranks (one launch runs every 2-rank case): losses and folders."""
    from alignment.logprobs import token_logps
    from alignment.models import load_policy
    from alignment.preference import add_reference_logps

    root = tmp_path_factory.mktemp("distributed")
    prompts, completions = data
    wrong = [str(int(c) + 1) if c.strip().isdigit() else c + "1" for c in completions]
    model, tokenizer = load_policy(tiny_model_dir)
    pairs = add_reference_logps(model, tokenizer, pl.DataFrame({"prompt": prompts, "chosen": completions, "rejected": wrong}), 16)
    pairs.write_parquet(root / "pairs.parquet")
    # GRPO: each prompt's group is its right and a wrong answer (advantages +1 and -1), with π_old = π_ref = the
    # start; a second epoch's updates move the ratio off 1, so clipping and the KL term both act.
    grouped = [(i, p, c, a) for i, (p, right, bad) in enumerate(zip(prompts, completions, wrong, strict=True))
               for c, a in ((right, 1.0), (bad, -1.0))]
    ids, group_prompts, group_completions, advantages = map(list, zip(*grouped, strict=True))
    logps = token_logps(model, tokenizer, group_prompts, group_completions, batch_size=16)
    pl.DataFrame({"prompt_id": ids, "prompt": group_prompts, "completion": group_completions, "advantage": advantages,
                  "old_logps": logps, "ref_logps": logps}).write_parquet(root / "groups.parquet")
    one = {
        "grpo": bodies.grpo_losses(str(tiny_model_dir), str(root / "one" / "grpo"), str(root / "groups.parquet"), GRPO),
        "sft": bodies.sft_losses(str(tiny_model_dir), str(root / "one" / "sft"), prompts, completions, SETTINGS),
        "dpo": bodies.dpo_losses(str(tiny_model_dir), str(root / "one" / "dpo"), str(root / "pairs.parquet"), SETTINGS),
        "lora": bodies.sft_losses(str(tiny_model_dir), str(root / "one" / "lora"), prompts, completions, {**SETTINGS, **LORA}),
    }
    cwd = os.getcwd()
    os.chdir(root)  # the ranks' logs go under ./.flywheel
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), old]))
    try:
        two = run_ranks(_world("fsdp"), "dist", "train", bodies.cases, str(tiny_model_dir), str(root / "two"), prompts,
                        completions, str(root / "pairs.parquet"), SETTINGS, LORA, str(root / "groups.parquet"), GRPO)
    finally:
        os.chdir(cwd)
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
    return root, one, two


@pytest.mark.parametrize("case", ["sft", "dpo", "grpo", "lora"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(compared, tiny_model_dir, case, strategy):
    """SFT, DPO and GRPO (and SFT with LoRA adapters and gradient checkpointing) on 2 ranks: world size 1's losses
    and weights; the saved folder is a plain model (adapters merged), with the files one process writes."""
    root, one, two = compared
    _assert_same((one[case], root / "one" / case), (two[f"{case}-{strategy}"], root / "two" / f"{case}-{strategy}"),
                 Path(tiny_model_dir))
    saved = root / "two" / f"{case}-{strategy}"
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in (root / "one" / case).iterdir())
    assert not any("lora" in name for name in _weights(saved))


def test_the_reference_pass_split_across_two_ranks_gives_every_pair_s_log_probs(compared, tiny_model_dir):
    """The pair stage's no-grad pass under a launch: each rank scores its block (9 and 8 of 17 pairs), and the
    gathered log-probs are one process's, in row order."""
    root, _, two = compared
    one = bodies.reference_logps(str(tiny_model_dir), str(root / "pairs.parquet"), SETTINGS)
    assert len(two["reference"]) == len(one) == 34
    assert two["reference"] == pytest.approx(one, rel=1e-5, abs=1e-5)


def test_a_killed_rank_ends_the_stage_with_one_sentence(ranks_env, tiny_model_dir, data):
    """SIGKILL one rank mid-training: the stage fails within the collective timeout, naming the rank and its
    log; no rank is left running and nothing is written to the output folder."""
    prompts, completions = data
    out = ranks_env / "out" / "model"
    out.parent.mkdir()
    killed: dict[str, int] = {}

    def kill_rank_1() -> None:
        pid_file = out.parent / "rank1.pid"
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # inside training by now (the body writes its pid, then loads the model and trains)
        killed["pid"] = int(pid_file.read_text())
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(RankFailed) as failure:
        run_ranks(_world("fsdp", timeout_s=30), "dist", "train", bodies.train_until_killed, str(tiny_model_dir), str(out),
                  prompts * 40, completions * 40, {**SETTINGS, "epochs": 50, "strategy": "fsdp"})
    took = time.monotonic() - started
    killer.join(timeout=5)
    message = str(failure.value)
    assert "rank 1 of 2 was killed by SIGKILL" in message and "\n" not in message
    log = Path(message.split("its output is in ", 1)[1].split(". Fix", 1)[0])
    assert log.exists()
    assert took < 120
    assert not out.exists()  # rank 0 never reached the save
    pids = [int((out.parent / f"rank{r}.pid").read_text()) for r in (0, 1)]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), pid


@pytest.mark.slow
def test_ray_train_gives_torchrun_s_losses(ranks_env, tiny_model_dir, data):
    """``launcher: ray``: the same body as Ray Train workers on a local 2-CPU Ray cluster, the same losses."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    prompts, completions = data
    settings = {**SETTINGS, "strategy": "fsdp"}
    by_torchrun = run_ranks(_world("fsdp"), "dist", "train", bodies.sft_losses, str(tiny_model_dir),
                            str(ranks_env / "torchrun"), prompts, completions, settings)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    try:
        world = _world("fsdp")
        world.distributed.launcher = "ray"
        by_ray = run_ranks(world, "dist", "train", bodies.sft_losses, str(tiny_model_dir), str(ranks_env / "ray"),
                           prompts, completions, settings)
    finally:
        ray.shutdown()
    assert by_ray == pytest.approx(by_torchrun, rel=1e-6), (by_ray, by_torchrun)
    _assert_same((by_torchrun, ranks_env / "torchrun"), (by_ray, ranks_env / "ray"), Path(tiny_model_dir))

