"""SFT throughput and memory: ``alignment.training.sft`` against TRL's ``SFTTrainer`` (completion-only loss).

Both sides fine-tune the bench Llama (``bench/realistic.py``, about 38M parameters, BPE + ChatML) on the
same ``--examples`` (prompt, completion) pairs — prompts of 50-200 tokens once templated, completions of
64-128 tokens — as chat, with the loss on completion tokens only (TRL: a conversational prompt-completion
dataset, whose default is ``completion_only_loss``), one optimiser step per batch of ``--batch-size``
examples, float32, AdamW, lr 1e-4, gradient clipping at 1.0, no warm-up, padding to the batch's longest, and
gradient checkpointing on both sides or off on both (``--gradient-checkpointing``, default on: TRL's
``SFTConfig`` turns it on unless told otherwise, so a comparison that leaves TRL's default and not ours
compares recomputed activations against stored ones).
The whole data set is one batch (``--examples == --batch-size`` by default), so every step sees the
same tokens on a side whatever its shuffle, and tokens/s is that side's real (non-pad) tokens per step
over its median step time.

Each side runs in its own fresh subprocess, ``--rounds`` times, alternating (ours, peer, ours, ...).
Step times are the gaps between consecutive step ends (ours: ``sft``'s ``on_step``; TRL: a
``TrainerCallback.on_step_end``), so the first step (and model loading, data preparation, saving)
is not timed. Peak memory is the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after the imports; ``ru_maxrss`` where that is refused) above the resident
set at that moment: model loading, the optimiser state and the activations of one step.
ratio = ours / peer tokens per second (target: >= 1).

Run on a laptop:   .venv/bin/python bench/bench_sft.py
Run on a GPU node: .venv/bin/python bench/bench_sft.py --examples 32 --batch-size 32
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_sampler.py

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

LR = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimiser step, both sides")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per round (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per side, alternating")
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on",
                        help="both sides (on: TRL SFTConfig's default, activations recomputed in the backward pass)")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # internal: run one side
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return

    from realistic import build_bench_model, completions, prompts

    from alignment.models import load_tokenizer

    workdir = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    model = build_bench_model(workdir / "model", n_layer=args.n_layer, n_embd=args.n_embd)
    tok = load_tokenizer(model.path)
    lengths = [64 + 64 * i // max(1, args.examples - 1) for i in range(args.examples)]
    data = {
        "prompts": prompts(tok, args.examples),
        "completions": [completions(tok, 1, n, seed=2 + i)[0] for i, n in enumerate(lengths)],
    }
    (workdir / "data.json").write_text(json.dumps(data))

    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.rounds):
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--workdir", str(workdir), "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--gradient-checkpointing", args.gradient_checkpointing]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"FAIL: the {side} side exited with code {proc.returncode}.")
            results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def summary(side: str) -> dict:
        runs = results[side]
        step_s = statistics.median(t for r in runs for t in r["step_s"])
        return {"step_s": step_s, "tokens": runs[0]["tokens_per_step"], "padded": runs[0]["padded_per_step"],
                "tps": runs[0]["tokens_per_step"] / step_s, "peak_mib": max(r["peak_mib"] for r in runs),
                "memory": runs[0]["memory"], "name": runs[0]["name"], "loss": runs[-1]["last_loss"]}  # fmt: skip

    ours, peer = summary("ours"), summary("trl")
    ratio = ours["tps"] / peer["tps"]
    print(f"\nSFT: {args.examples} examples, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds per side; "
          f"{model.shape} ({model.params / 1e6:.1f}M params), cpu ({os.cpu_count()} cores)")
    print(f"ours: alignment.training.sft; peer: {peer['name']} (completion-only loss); "
          f"gradient checkpointing {args.gradient_checkpointing} on both\n")
    print(f"{'':34}{'ours':>12}{'peer':>12}")
    print(f"{'tokens per step (real / padded)':34}{ours['tokens']:>7}/{ours['padded']:<4}{peer['tokens']:>7}/{peer['padded']:<4}")
    print(f"{'median step (s)':34}{ours['step_s']:>12.3f}{peer['step_s']:>12.3f}")
    print(f"{'tokens/s':34}{ours['tps']:>12.1f}{peer['tps']:>12.1f}")
    print(f"{'peak RSS above start (MiB)':34}{ours['peak_mib']:>12.0f}{peer['peak_mib']:>12.0f}")
    print(f"{'loss after the last step':34}{ours['loss']:>12.4f}{peer['loss']:>12.4f}")
    print(f"{'ratio ours/peer tokens/s':34}{ratio:>12.3f}")
    print(f"(memory: {ours['memory']}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print(json.dumps({
        "bench": "sft", "ratio": round(ratio, 3), "ratio_means": "ours/peer training tokens per second",
        "target": ">=1", "model_params": model.params, "model": model.shape, "peer": peer["name"],
        "ours_tokens_per_s": round(ours["tps"], 1), "peer_tokens_per_s": round(peer["tps"], 1),
        "ours_step_s": round(ours["step_s"], 3), "peer_step_s": round(peer["step_s"], 3),
        "ours_peak_rss_mib": round(ours["peak_mib"]), "peer_peak_rss_mib": round(peer["peak_mib"]),
        "memory_means": ours["memory"], "tokens_per_step": {"ours": ours["tokens"], "peer": peer["tokens"]},
        "padded_tokens_per_step": {"ours": ours["padded"], "peer": peer["padded"]},
        "batch_size": args.batch_size, "examples": args.examples, "gradient_checkpointing": args.gradient_checkpointing,
        "ours_steps_s": [r["step_s"] for r in results["ours"]], "peer_steps_s": [r["step_s"] for r in results["trl"]],
    }))  # fmt: skip


# --- one side, in its own process -------------------------------------------------------------


def run_side(args) -> None:
    import warnings

    import torch
    import transformers

    from alignment.training import TrainConfig, sft

    if args.side == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer, __version__  # noqa: F401

        datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    workdir = Path(args.workdir)
    data = json.loads((workdir / "data.json").read_text())
    model_path = workdir / "model"
    stamps: list[float] = []
    losses: list[float] = []
    memory, start_rss = _reset_peak()

    if args.side == "ours":
        from alignment.models import load_tokenizer
        from alignment.prompting import Formatter

        tok = load_tokenizer(model_path)
        fmt = Formatter(tok)
        lengths = [len(fmt.example(p, c)[0]) for p, c in zip(data["prompts"], data["completions"], strict=True)]
        cfg = TrainConfig(epochs=args.steps, lr=LR, batch_size=args.batch_size, warmup_steps=0, seed=0,
                          gradient_checkpointing=args.gradient_checkpointing == "on")

        def on_step(step: int, loss: float) -> None:
            stamps.append(time.perf_counter())
            losses.append(loss)

        sft(model_path, workdir / "out-ours", data["prompts"], data["completions"], cfg, progress=False, on_step=on_step)
        name = "alignment.training.sft"
    else:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer, __version__

        from alignment.models import load_policy

        model, tok = load_policy(model_path)
        rows = [
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in zip(data["prompts"], data["completions"], strict=True)
        ]

        class Stamp(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                stamps.append(time.perf_counter())

            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        config = SFTConfig(
            output_dir=str(workdir / "out-trl"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
            max_length=None, packing=False, completion_only_loss=True, report_to="none", save_strategy="no",
            gradient_checkpointing=args.gradient_checkpointing == "on",
            logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Stamp()])
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        trainer.train()
        name = f"TRL {__version__} SFTTrainer"

    step_s = [round(b - a, 4) for a, b in zip(stamps, stamps[1:])]
    batch = lengths[: args.batch_size]  # the whole data set is one batch by default
    print(json.dumps({
        "name": name, "step_s": step_s, "tokens_per_step": sum(batch), "padded_per_step": max(batch) * len(batch),
        "peak_mib": (_peak_bytes() - start_rss) / 2**20, "memory": memory, "last_loss": losses[-1] if losses else float("nan"),
    }))  # fmt: skip


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> tuple[str, int]:
    """Reset the resident set's high-water mark; say how peak memory is measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "peak RSS (VmHWM, reset after imports) above RSS at reset", _status("VmRSS")
    except OSError:
        return "peak RSS of the process (ru_maxrss) above RSS after imports", _status("VmRSS")


def _peak_bytes() -> int:
    try:
        return _status("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
