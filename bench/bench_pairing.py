"""Benchmark: preference pairing and ReST filtering of 1M scored rows, our polars code against pandas.

What it measures: the Improve-step data work of one iteration over a synthetic scored frame
(125k prompts x 8 samples, seeded, rewards on a 1/16 grid so ties and duplicate completions are
common): ReST's threshold filter (``tau_1`` from ``filters.rest_thresholds``, ReST arXiv 2308.08998,
Algorithm 1), top-k per prompt, and the three pairing strategies of ``alignment.pairs``. The peer
is a straightforward pandas version of the same semantics (sort + drop_duplicates, groupby
idxmax/idxmin/head, merge; no ``groupby.apply``), run in the same invocation.

Each (implementation, operation) runs in its own subprocess of this one invocation, on the same
Parquet input, one after the other: time (wall and process CPU) is the best of ``--repeats`` runs
(the machine is shared, so the minimum is the stable figure), memory is
the peak resident set during the operation above the resident set once the input is loaded
(``VmHWM`` reset through ``/proc/self/clear_refs``; where that is refused, ``ru_maxrss``). Outputs of
the two implementations are compared for exact equality before their figures are printed. The
last stdout line is the JSON result ``bench/run.py`` collects; its ``ratio`` is pandas / polars
wall time over all five operations. It is a regression check, not a speed goal (filtering and pairing
1M rows takes a fraction of a second, noise beside generation): the target is only that polars is no
slower than pandas (``>= 1``).

Run on a laptop or worker (CPU only; one to two minutes on 2 busy cores):

    .venv/bin/python bench/bench_pairing.py                     # 125k prompts x 8 samples
    .venv/bin/python bench/bench_pairing.py --prompts 10000     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment import filters  # noqa: E402
from alignment.pairs import _ROUNDING, PAIR_SCHEMA, make_pairs  # noqa: E402

OPS = ("rest_filter", "top_k", "best_vs_worst", "best_vs_random", "all_pairs")
MIN_MARGIN, SEED, IMPROVE_STEPS, TOP_K = 0.25, 7, 3, 2
_MASK63 = 2**63 - 1


def synthetic(prompts: int, samples: int, seed: int) -> pl.DataFrame:
    """A scored frame: answers drawn from 24 strings (so duplicates occur), rewards k/16."""
    rng = np.random.default_rng(seed)
    n = prompts * samples
    prompt_id = np.repeat(np.arange(prompts, dtype=np.int64), samples)
    answer = rng.integers(0, 24, n)
    prompt_text = pl.Series(prompt_id).cast(pl.Utf8)
    return pl.DataFrame(
        {
            "prompt_id": prompt_id,
            "prompt": "Q" + prompt_text + ": what is the answer?",
            "reference": pl.Series(prompt_id % 24).cast(pl.Utf8),
            "completion": "answer " + pl.Series(answer).cast(pl.Utf8),
            "sample_idx": np.tile(np.arange(samples, dtype=np.int32), prompts),
            "policy_version": "3",
            "reward": rng.integers(0, 17, n) / 16.0,
            "num_tokens": rng.integers(2, 40, n, dtype=np.int32),
        }
    )


# ----------------------------------------------------------------------------- polars: the shipped code
def polars_ops() -> dict[str, Callable[[pl.DataFrame], pl.DataFrame]]:
    def rest_filter(scored: pl.DataFrame) -> pl.DataFrame:
        distinct = filters.dedupe(scored)
        tau = filters.rest_thresholds(distinct["reward"].mean(), distinct["reward"].max(), IMPROVE_STEPS)[0]
        return filters.at_least(distinct, tau)

    return {
        "rest_filter": rest_filter,
        "top_k": lambda scored: filters.top_k(filters.dedupe(scored), TOP_K),
        **{s: (lambda scored, s=s: make_pairs(scored, s, MIN_MARGIN, SEED)) for s in OPS[2:]},
    }


# ----------------------------------------------------------------------------- pandas: the peer
def pandas_ops() -> dict[str, Callable]:
    def distinct(df):
        ordered = df.sort_values(["prompt_id", "sample_idx"])
        return ordered.drop_duplicates(["prompt_id", "completion"], keep="first").reset_index(drop=True)

    def rest_filter(df):
        d = distinct(df)
        tau = filters.rest_thresholds(d["reward"].mean(), d["reward"].max(), IMPROVE_STEPS)[0]  # scalar maths, shared
        return d[d["reward"] >= tau].assign(threshold=tau)

    def top_k(df):
        ranked = distinct(df).sort_values(["prompt_id", "reward", "sample_idx"], ascending=[True, False, True])
        kept = ranked.groupby("prompt_id", sort=False).head(TOP_K)
        return kept.assign(threshold=kept.groupby("prompt_id")["reward"].transform("min"))

    def extreme(d, how, side):
        # d is sorted by (prompt_id, sample_idx): idxmax/idxmin return the first, i.e. lowest sample_idx.
        rows = d.loc[getattr(d.groupby("prompt_id")["reward"], how)(), ["prompt_id", "sample_idx", "reward"]]
        return rows.rename(columns={"sample_idx": f"{side}_idx", "reward": f"{side}_reward"})

    def kept(p):
        w, lo = p["chosen_reward"], p["rejected_reward"]
        margin = w - lo
        return p[(margin > 0.0) & (margin + _ROUNDING * (w.abs() + lo.abs() + MIN_MARGIN) >= MIN_MARGIN)]

    def rivals(d, side):
        return d[["prompt_id", "sample_idx", "reward"]].rename(
            columns={"sample_idx": f"{side}_idx", "reward": f"{side}_reward"}
        )

    def with_text(index, d):
        chosen = d[["prompt_id", "prompt", "reference", "sample_idx", "completion"]].rename(
            columns={"sample_idx": "chosen_idx", "completion": "chosen"}
        )
        rejected = d[["prompt_id", "sample_idx", "completion"]].rename(
            columns={"sample_idx": "rejected_idx", "completion": "rejected"}
        )
        out = index.merge(chosen, on=["prompt_id", "chosen_idx"]).merge(rejected, on=["prompt_id", "rejected_idx"])
        out["margin"] = out["chosen_reward"] - out["rejected_reward"]
        return out[list(PAIR_SCHEMA)].sort_values(["prompt_id", "chosen_idx", "rejected_idx"]).reset_index(drop=True)

    def best_vs_worst(df):
        d = distinct(df)
        best_worst = extreme(d, "idxmax", "chosen").merge(extreme(d, "idxmin", "rejected"), on="prompt_id")
        return with_text(kept(best_worst), d)

    def best_vs_random(df):
        d = distinct(df)
        cands = kept(extreme(d, "idxmax", "chosen").merge(rivals(d, "rejected"), on="prompt_id"))
        cands = cands.assign(key=row_key(SEED, cands["prompt_id"].to_numpy(), cands["rejected_idx"].to_numpy()))
        picked = cands.sort_values(["prompt_id", "key", "rejected_idx"]).drop_duplicates("prompt_id")
        return with_text(picked.drop(columns="key"), d)

    def all_pairs(df):
        d = distinct(df)
        return with_text(kept(rivals(d, "chosen").merge(rivals(d, "rejected"), on="prompt_id")), d)

    return {
        "rest_filter": rest_filter,
        "top_k": top_k,
        "best_vs_worst": best_vs_worst,
        "best_vs_random": best_vs_random,
        "all_pairs": all_pairs,
    }


def row_key(seed: int, prompt_id: np.ndarray, sample_idx: np.ndarray) -> np.ndarray:
    """``samplers.row_seed`` over numpy arrays (uint64 arithmetic wraps, as in the polars version)."""
    u = np.uint64
    with np.errstate(over="ignore"):
        x = u((seed * 0x9E3779B97F4A7C15) & (2**64 - 1)) + prompt_id.astype(np.int64).astype(u) * u(0xBF58476D1CE4E5B9)
        x = x + sample_idx.astype(np.int64).astype(u) * u(0x94D049BB133111EB)
        x ^= x >> u(31)
        x *= u(0xD6E8FEB86659FD93)
        x ^= x >> u(32)
    return x & u(_MASK63)


# ----------------------------------------------------------------------------- measurement
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(impl: str, op: str, data: Path, out: Path, repeats: int) -> None:
    """Run one operation ``repeats`` times on the input; print timing and memory as JSON."""
    if impl == "polars":
        frame, fn = pl.read_parquet(data), polars_ops()[op]
    else:
        import pandas as pd

        frame, fn = pd.read_parquet(data), pandas_ops()[op]
    base_kib = _rss_kib("VmRSS")
    exact = _reset_peak()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn(frame)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        del result
    peak_kib = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn(frame)
    (result if impl == "polars" else pl.from_pandas(result)).write_parquet(out)
    peak_mib = max(0, peak_kib - base_kib) / 1024
    print(json.dumps({"wall": min(wall), "cpu": min(cpu), "peak_mib": peak_mib, "rows": len(result)}))


def measure(impl: str, op: str, data: Path, workdir: Path, repeats: int) -> dict:
    out = workdir / f"{impl}-{op}.parquet"
    cmd = [sys.executable, __file__, "--child", impl, op, str(data), str(out), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} {op} failed:\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "out": out}


def identical(a: Path, b: Path) -> bool:
    left, right = pl.read_parquet(a), pl.read_parquet(b)
    return left.columns == right.columns and left.equals(right.cast(left.schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=125_000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=4, metavar=("IMPL", "OP", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, op, data, out = args.child
        return child(impl, op, Path(data), Path(out), args.repeats)
    with tempfile.TemporaryDirectory(prefix="bench-pairing-") as tmp:
        workdir = Path(tmp)
        data = workdir / "scored.parquet"
        synthetic(args.prompts, args.samples, args.seed).write_parquet(data)
        print(
            f"{args.prompts * args.samples:,} scored rows ({args.prompts:,} prompts x {args.samples}); "
            f"min_margin={MIN_MARGIN}; best of {args.repeats}; polars {pl.__version__} vs pandas; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        print(_row("operation", "rows out", "wall s", "", "cpu s", "", "peak MiB", "", "identical"))
        print(_row("", "", "polars", "pandas", "polars", "pandas", "polars", "pandas", ""))
        totals = dict.fromkeys(("polars_wall", "pandas_wall", "polars_cpu", "pandas_cpu"), 0.0)
        per_op = {}
        for op in OPS:
            res = {impl: measure(impl, op, data, workdir, args.repeats) for impl in ("polars", "pandas")}
            if not identical(res["polars"]["out"], res["pandas"]["out"]):
                raise SystemExit(f"{op}: polars and pandas outputs differ; the benchmark is void.")
            p, q = res["polars"], res["pandas"]
            per_op[op] = {f"{impl}_{k}": round(r[k], 4) for impl, r in res.items() for k in ("wall", "cpu", "peak_mib")}
            for impl, r in res.items():
                totals[f"{impl}_wall"] += r["wall"]
                totals[f"{impl}_cpu"] += r["cpu"]
            print(_row(op, f"{p['rows']:,}", *_pair(p["wall"], q["wall"]), *_pair(p["cpu"], q["cpu"]),
                       f"{p['peak_mib']:.0f}", f"{q['peak_mib']:.0f}", "yes"))
        wall = _pair(totals["polars_wall"], totals["pandas_wall"])
        cpu = _pair(totals["polars_cpu"], totals["pandas_cpu"])
        print(_row("total", "", *wall, *cpu, "", "", ""))
        print("x = pandas time / polars time (higher is better for polars)")
        print(json.dumps({
            "bench": "pairing",
            "ratio": round(totals["pandas_wall"] / totals["polars_wall"], 2),
            "ratio_means": "pandas / polars wall time, all five operations summed (best of repeats each)",
            "target": ">=1",
            "cpu_ratio": round(totals["pandas_cpu"] / totals["polars_cpu"], 2),
            "rows": args.prompts * args.samples,
            "load_average": round(os.getloadavg()[0], 1),
            "operations": per_op,
        }))


def _pair(ours: float, peer: float) -> tuple[str, str]:
    return f"{ours:.3f}", f"{peer:.3f} ({peer / ours:.1f}x)"


def _row(*cells: str) -> str:
    widths = (16, 11, 8, 15, 8, 15, 8, 8, 10)
    return "".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

if __name__ == "__main__":
    main()
