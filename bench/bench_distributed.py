"""Training on two processes against one: per-rank memory, loss agreement and step time (FSDP2 and DDP).

The bench Llama (``bench/realistic.py``, 4 layers × 384 wide, BPE + ChatML, about 12.6M parameters)
is fine-tuned with ``alignment.training.sft`` — the one training loop — on 32 chat examples (prompts
of 50–200 tokens, answers of 64), 4 optimiser steps of 8, micro-batches of 4, float32, launched the
way a training stage launches it (``tasks.launch.run_ranks``: torchrun, gloo on CPU, NCCL on GPU):

- world size 1 (one rank, the same launcher, so both sides pay the same start-up),
- world size 2 with ``fsdp`` (FSDP2: parameters, gradients and AdamW state sharded per decoder layer),
- world size 2 with ``ddp`` (a whole model per rank, gradients averaged).

Each rank measures, after its first optimiser step, the bytes its parameters and its AdamW state hold
on that rank (a DTensor counts its local shard; the optimizer is the loop's own, found among live
objects), and the wall time of each step. The headline ratio is FSDP's per-rank parameter + optimizer
memory at world size 2 over world size 1 (target ≤ 0.55: half, plus what FSDP keeps whole); the
losses of every step must agree with world size 1's to 1e-4 (relative), else the bench fails.

Run on a laptop:   .venv/bin/python bench/bench_distributed.py
Run on a GPU node: .venv/bin/python bench/bench_distributed.py --n-layer 8 --n-embd 512 --examples 64
(on a node with 2+ GPUs the ranks use NCCL, one GPU each).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_sampler.py

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOLERANCE = 1e-4


def measure(model_dir: str, out_dir: str, prompts: list[str], completions: list[str], settings: dict) -> dict:
    """A rank's body: SFT with the settings; this rank's parameter and optimizer bytes after step 1, step times."""
    import torch

    from alignment.train_settings import TrainConfig
    from alignment.training import sft

    losses, ends, held = [], [time.perf_counter()], {}

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        ends.append(time.perf_counter())
        if step == 1:
            optimizers = [o for o in gc.get_objects() if isinstance(o, torch.optim.AdamW)]
            state = [v for o in optimizers for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
            held.update(params=sum(local_bytes(p) for p in params), optimizer=sum(local_bytes(v) for v in state))

    # on_step runs on rank 0 only: every rank holds the same share (FSDP splits evenly), so rank 0 speaks for each.
    sft(model_dir, out_dir, prompts, completions, TrainConfig(**settings), progress=False, on_step=on_step)
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {"losses": losses, "step_s": steps, **held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    from realistic import build_bench_model, completions, prompts

    from alignment.models import load_tokenizer
    from tasks.launch import run_ranks

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-distributed-"))
    os.chdir(work)  # the ranks' logs go under ./.flywheel
    bench = build_bench_model(work / "policy", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    tokenizer = load_tokenizer(bench.path)
    ps = prompts(tokenizer, args.examples)
    cs = completions(tokenizer, args.examples, 64)
    settings = {"epochs": 1, "lr": 1e-4, "batch_size": args.batch_size, "micro_batch_size": args.batch_size // 2,
                "warmup_steps": 0, "seed": 0}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT)])  # the ranks import this module by name
    from bench_distributed import measure as rank_body  # the module's own name, which the ranks can import

    results = {}
    for label, strategy, processes in (("1 process", "fsdp", 1), ("2 x fsdp", "fsdp", 2), ("2 x ddp", "ddp", 2)):
        world = SimpleNamespace(
            distributed=SimpleNamespace(strategy=strategy, processes=processes, nodes=1, launcher="torchrun", timeout_s=600),
            orchestration=SimpleNamespace(ray_address=None),
        )
        started = time.perf_counter()
        results[label] = run_ranks(world, "bench", "train", rank_body, str(bench.path), str(work / label.replace(" ", "")),
                                   ps, cs, {**settings, "strategy": strategy})
        results[label]["wall_s"] = time.perf_counter() - started

    one = results["1 process"]
    mib = lambda r: (r["params"] + r["optimizer"]) / 2**20  # noqa: E731
    print(f"bench Llama {bench.shape}, {bench.params / 1e6:.1f}M parameters; {args.examples} examples, "
          f"{len(one['losses'])} steps of {args.batch_size}, micro-batches of {args.batch_size // 2}, float32, CPU gloo")
    print(f"{'':10} {'params MiB':>11} {'AdamW MiB':>10} {'per rank':>9} {'step s':>8} {'wall s':>7}  max loss diff")
    worst = 0.0
    for label, r in results.items():
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], one["losses"], strict=True))
        worst = max(worst, diff)
        print(f"{label:10} {r['params'] / 2**20:11.1f} {r['optimizer'] / 2**20:10.1f} {mib(r):9.1f} "
              f"{statistics.median(r['step_s']):8.3f} {r['wall_s']:7.1f}  {diff:.2e}")
    ratio = mib(results["2 x fsdp"]) / mib(one)
    print(f"FSDP per-rank parameter + optimizer memory at world size 2: {ratio:.3f} x world size 1 (target <= 0.55)")
    print(json.dumps({
        "bench": "distributed", "ratio": round(ratio, 4),
        "ratio_means": "per-rank parameter+AdamW memory, FSDP world size 2 / world size 1", "target": "<=0.55",
        "max_rel_loss_diff": worst, "params": bench.params,
        "step_s": {k: round(statistics.median(r["step_s"]), 4) for k, r in results.items()},
        "per_rank_mib": {k: round(mib(r), 2) for k, r in results.items()},
    }))
    if worst > TOLERANCE:
        raise SystemExit(f"the losses of world size 2 differ from world size 1's by {worst:.2e} (> {TOLERANCE})")


if __name__ == "__main__":
    main()
