"""Grow's sampler (alignment.samplers.hf, batched Gumbel-max) against a naive per-prompt ``generate`` loop.

The peer is what one writes first with transformers: for each prompt,
``model.generate(do_sample=True, num_return_sequences=N)``. Both sides use the same tiny GPT-2
(character tokenizer, built with ``build_tiny_gpt2`` and warm-started with ``alignment.training.sft``
on the arithmetic task's labelled sums for a few epochs, so completions stop at EOS after a few
tokens as they do in the demo, instead of always running to ``max_new_tokens``), the same prompts,
N, temperature 1, top-p 1 (no top-k on either side) and ``max_new_tokens``. Each side is warmed up
once, then the two alternate for ``--repeats`` timed rounds and the median samples/s of each is
reported; ratio = ours / peer (target: > 1, ours faster). OpenMP waits passively (see below)
unless ``OMP_WAIT_POLICY`` is set.

Run on a laptop:   .venv/bin/python bench/bench_sampler.py
Run on a GPU node: .venv/bin/python bench/bench_sampler.py --prompts 512 --n 16
"""

from __future__ import annotations

import os

# Before torch is imported: OpenMP's default active spin-wait, on cores oversubscribed by other
# processes, made torch 5-10x slower on the thread that first used OpenMP, and by amounts that
# swing from round to round. Passive waiting keeps the timings on a shared machine comparable;
# export OMP_WAIT_POLICY=active to measure with torch's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from alignment.arithmetic import arithmetic_task  # noqa: E402
from alignment.models import build_tiny_gpt2, load_policy  # noqa: E402
from alignment.samplers import SamplingParams  # noqa: E402
from alignment.samplers.hf import TransformersSampler  # noqa: E402
from alignment.training import TrainConfig, sft  # noqa: E402


def quiet() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def warm_started_model(workdir: Path, epochs: int) -> Path:
    """The demo's tiny GPT-2, behaviour-cloned on the 200 labelled sums for ``epochs`` epochs."""
    task = arithmetic_task()
    texts = [*task.prompts["prompt"], *task.labelled["completion"], *task.eval["reference"]]
    base = build_tiny_gpt2(texts, workdir / "base")
    out = workdir / "warm"
    cfg = TrainConfig(epochs=epochs, lr=3e-3, batch_size=16)
    sft(base, out, task.labelled["prompt"].to_list(), task.labelled["completion"].to_list(), cfg, progress=False)
    return out


class NaiveSampler:
    """The peer: one ``generate(do_sample=True, num_return_sequences=n)`` call per prompt."""

    def __init__(self, model_path: Path):
        self.model, self.tokenizer = load_policy(model_path)

    @torch.inference_mode()
    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> tuple[list[list[str]], list[list[int]]]:
        torch.manual_seed(params.seed)
        eos = self.tokenizer.eos_token_id
        texts, counts = [], []
        for prompt in prompts:
            enc = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
            out = self.model.generate(
                **enc, do_sample=True, num_return_sequences=n, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p, top_k=0,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
            )
            rows = out[:, enc["input_ids"].shape[1] :].tolist()
            rows = [r[: r.index(eos) + 1] if eos in r else r for r in rows]
            counts.append([len(r) for r in rows])
            texts.append([self.tokenizer.decode(r, skip_special_tokens=True) for r in rows])
        return texts, counts


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96, help="prompts sampled per round")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (the demo's N)")
    parser.add_argument("--max-new-tokens", type=int, default=5, help="the demo's grow.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=256, help="our sampler's batch size (the recipe default)")
    parser.add_argument("--warm-epochs", type=int, default=8, help="warm-start epochs; 0 = untrained model")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per side")
    args = parser.parse_args()
    quiet()

    workdir = Path(tempfile.mkdtemp(prefix="bench_sampler_"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    task = arithmetic_task()
    if args.warm_epochs > 0:
        model_path = warm_started_model(workdir, args.warm_epochs)
        model_note = f"warm-started {args.warm_epochs} epochs on 200 labelled sums"
    else:
        texts = [*task.prompts["prompt"], *task.labelled["completion"], *task.eval["reference"]]
        model_path = build_tiny_gpt2(texts, workdir / "base")
        model_note = "untrained"
    prompts = task.prompts["prompt"].to_list()[: args.prompts]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    ours = TransformersSampler(str(model_path), batch_size=args.batch_size, progress=False)
    peer = NaiveSampler(model_path)
    ours_run = lambda: ours.generate(prompts, args.n, params)  # noqa: E731
    peer_run = lambda: peer.generate(prompts, args.n, params)  # noqa: E731
    ours_run(), peer_run()  # warm-up

    ours_times, peer_times = [], []
    for _ in range(args.repeats):
        t, gen = timed(ours_run)
        ours_times.append(t)
        t, (_, peer_counts) = timed(peer_run)
        peer_times.append(t)
    samples = len(prompts) * args.n
    t_ours, t_peer = statistics.median(ours_times), statistics.median(peer_times)
    rate_ours, rate_peer = samples / t_ours, samples / t_peer
    tok_ours = statistics.mean(c for row in gen.num_tokens for c in row)
    tok_peer = statistics.mean(c for row in peer_counts for c in row)
    references = task.prompts["reference"].to_list()[: args.prompts]
    right = [c == ref for ref, row in zip(references, gen.completions, strict=True) for c in row]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nsampling {len(prompts)} prompts x N={args.n}, max_new_tokens={args.max_new_tokens}, "
          f"GPT-2 2x96 ({model_note}), {device}")
    print(f"ours: TransformersSampler, batch_size={args.batch_size}; peer: per-prompt generate(do_sample=True, "
          f"num_return_sequences={args.n}); median of {args.repeats}\n")
    print(f"{'':32}{'ours':>12}{'peer':>12}")
    print(f"{'median round (s)':32}{t_ours:>12.3f}{t_peer:>12.3f}")
    print(f"{'samples/s':32}{rate_ours:>12.1f}{rate_peer:>12.1f}")
    print(f"{'mean completion tokens':32}{tok_ours:>12.2f}{tok_peer:>12.2f}")
    print(f"{'ratio ours/peer samples/s':32}{rate_ours / rate_peer:>12.2f}")
    print(f"(exact-match rate of our samples: {sum(right) / len(right):.2f})")
    print(f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})")
    print(json.dumps({
        "bench": "sampler", "ratio": round(rate_ours / rate_peer, 3), "ratio_means": "ours/peer samples per second",
        "target": ">1", "ours_samples_per_s": round(rate_ours, 1), "peer_samples_per_s": round(rate_peer, 1),
        "ours_round_s": [round(t, 4) for t in ours_times], "peer_round_s": [round(t, 4) for t in peer_times], "samples": samples, "n": args.n,
        "max_new_tokens": args.max_new_tokens, "mean_tokens_ours": round(tok_ours, 2),
        "mean_tokens_peer": round(tok_peer, 2), "model": model_note, "device": device,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }))


if __name__ == "__main__":
    main()
