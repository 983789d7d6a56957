"""Grow's sampler (alignment.samplers.hf) against the best plain-transformers usage, on a realistic model.

Model: the bench Llama (``bench/realistic.py``: 8 layers, 512 wide, BPE vocabulary of 8192, ChatML; about
38M parameters, random weights, so every sample runs to ``max_new_tokens`` on both sides). Prompts are
50-200 tokens once templated, N = 8 samples each, 64 new tokens, temperature 1 and top-p 0.95 on both
sides (no top-k).

- ours: ``TransformersSampler`` with ``batch_size`` rows per ``generate`` call (rows sorted by prompt
  length; each distinct prompt's prefix run once, not once per sample, into a cache allocated for
  the whole generation; Gumbel-max with counter-based noise, so each sample depends only on (seed,
  prompt id, sample index)).
- peer: what a user writes for throughput with plain transformers — prompts sorted by length, left-padded,
  ``model.generate(do_sample=True, num_return_sequences=N)`` over ``batch_size // N`` prompts per call
  (the default puts every row in one call: the largest batch there is; on a CPU memory is not the limit).

Each side is warmed up on two prompts, then the two alternate for ``--repeats`` timed rounds; the median
round gives samples/s and generated tokens/s (every token up to and including the first end id). ratio
= ours / peer samples per second (target: >= 1). OpenMP waits passively unless ``OMP_WAIT_POLICY`` is set.

Run on a laptop:   .venv/bin/python bench/bench_sampler.py
Run on a GPU node: .venv/bin/python bench/bench_sampler.py --prompts 256 --batch-size 1024 --max-new-tokens 128
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
from realistic import build_bench_model, prompts  # noqa: E402

from alignment.models import load_policy  # noqa: E402
from alignment.samplers import SamplingParams  # noqa: E402
from alignment.samplers.hf import TransformersSampler  # noqa: E402


def quiet() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


class PlainSampler:
    """The peer: batched ``generate(do_sample=True, num_return_sequences=n)``, prompts sorted by length."""

    def __init__(self, model_path: Path, batch_size: int):
        self.model, self.tokenizer = load_policy(model_path)
        self.tokenizer.padding_side = "left"
        self.ends = set(self.model.generation_config.eos_token_id)
        self.batch_size = batch_size

    @torch.inference_mode()
    def generate(self, texts: list[str], n: int, params: SamplingParams) -> tuple[list[list[str]], list[list[int]]]:
        torch.manual_seed(params.seed)
        tok = self.tokenizer
        chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(chats[i]))
        per_call = max(1, self.batch_size // n)
        out_texts: dict[int, list[str]] = {}
        out_counts: dict[int, list[int]] = {}
        for start in range(0, len(order), per_call):
            idx = order[start : start + per_call]
            enc = tok([chats[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            gen = self.model.generate(
                **enc, do_sample=True, num_return_sequences=n, max_new_tokens=params.max_new_tokens,
                temperature=params.temperature, top_p=params.top_p, top_k=0,
                pad_token_id=tok.pad_token_id, eos_token_id=sorted(self.ends),
            )  # fmt: skip
            rows = gen[:, enc["input_ids"].shape[1] :].tolist()
            for k, i in enumerate(idx):
                mine = [_until_end(r, self.ends) for r in rows[k * n : (k + 1) * n]]
                out_counts[i] = [len(r) for r in mine]
                out_texts[i] = [tok.decode(r, skip_special_tokens=True) for r in mine]
        return [out_texts[i] for i in range(len(texts))], [out_counts[i] for i in range(len(texts))]


def _until_end(row: list[int], ends: set[int]) -> list[int]:
    for k, t in enumerate(row):
        if t in ends:
            return row[: k + 1]
    return row


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
    parser.add_argument("--prompts", type=int, default=16, help="prompts sampled per round (50-200 tokens each)")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per generate call, both sides (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side")
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=512)
    args = parser.parse_args()
    quiet()

    workdir = Path(tempfile.mkdtemp(prefix="bench_sampler_"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    bench_model = build_bench_model(workdir / "model", n_layer=args.n_layer, n_embd=args.n_embd)
    batch_size = args.batch_size or args.prompts * args.n
    ours = TransformersSampler(str(bench_model.path), batch_size=batch_size, progress=False)
    peer = PlainSampler(bench_model.path, batch_size)
    texts = prompts(ours.tokenizer, args.prompts)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=0)

    ours.generate(texts[:2], args.n, params), peer.generate(texts[:2], args.n, params)  # warm-up
    ours_times, peer_times = [], []
    for _ in range(args.repeats):
        t, gen = timed(lambda: ours.generate(texts, args.n, params))
        ours_times.append(t)
        t, (_, peer_counts) = timed(lambda: peer.generate(texts, args.n, params))
        peer_times.append(t)
    samples = len(texts) * args.n
    t_ours, t_peer = statistics.median(ours_times), statistics.median(peer_times)
    tokens_ours = sum(c for row in gen.num_tokens for c in row)
    tokens_peer = sum(c for row in peer_counts for c in row)
    rate_ours, rate_peer = samples / t_ours, samples / t_peer
    tps_ours, tps_peer = tokens_ours / t_ours, tokens_peer / t_peer
    prompt_tokens = [len(ids) for ids in ours.formatter.check_prompts(texts, args.max_new_tokens)]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nsampling {len(texts)} prompts ({min(prompt_tokens)}-{max(prompt_tokens)} tokens) x N={args.n}, "
          f"max_new_tokens={args.max_new_tokens}, T={args.temperature}, top_p={args.top_p}; "
          f"{bench_model.shape} ({bench_model.params / 1e6:.1f}M params), {device}")
    print(f"ours: TransformersSampler(batch_size={batch_size}); peer: generate(do_sample=True, num_return_sequences={args.n}) "
          f"over {max(1, batch_size // args.n)} prompts per call; median of {args.repeats}\n")
    print(f"{'':32}{'ours':>12}{'peer':>12}")
    print(f"{'median round (s)':32}{t_ours:>12.2f}{t_peer:>12.2f}")
    print(f"{'samples/s':32}{rate_ours:>12.2f}{rate_peer:>12.2f}")
    print(f"{'generated tokens/s':32}{tps_ours:>12.1f}{tps_peer:>12.1f}")
    print(f"{'mean completion tokens':32}{tokens_ours / samples:>12.2f}{tokens_peer / samples:>12.2f}")
    print(f"{'ratio ours/peer samples/s':32}{rate_ours / rate_peer:>12.3f}")
    print(f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print(json.dumps({
        "bench": "sampler", "ratio": round(rate_ours / rate_peer, 3), "ratio_means": "ours/peer samples per second",
        "target": ">=1", "model_params": bench_model.params, "model": bench_model.shape,
        "ours_samples_per_s": round(rate_ours, 2), "peer_samples_per_s": round(rate_peer, 2),
        "ours_tokens_per_s": round(tps_ours, 1), "peer_tokens_per_s": round(tps_peer, 1),
        "tokens_ratio": round(tps_ours / tps_peer, 3),
        "ours_round_s": [round(t, 3) for t in ours_times], "peer_round_s": [round(t, 3) for t in peer_times],
        "samples": samples, "n": args.n, "batch_size": batch_size, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)], "temperature": args.temperature, "top_p": args.top_p,
        "device": device, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
