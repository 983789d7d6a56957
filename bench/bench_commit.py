"""How a stage is committed to its table: flywheel's staged Parquet + manifest against Delta Lake.

The measurement behind the lake's commit protocol (docs/lake.md). Both sides commit the same
stages — ``--stages`` partitions (run, iteration) of a ``scored``-like frame of ``--rows`` rows in
``--parts`` parts, as a sharded Grow step leaves them — to one table, on the local filesystem and on
S3 (a SeaweedFS server on loopback, started here), then re-commit one partition (a retried stage):

- **direct**: ``tasks.lake.Lake.write_stage``, for a stage computed in one process — parts uploaded
  into ``{table}/run=R/iteration=G/``, manifest written last under ``runs/``.
- **staged**: ``Lake.write_part`` per shard + ``Lake.commit``, for a sharded stage (Grow, scoring) —
  parts written to the run's staging area as shards finish, moved into the partition at commit
  (rename / server-side copy), manifest last.
- **delta**: ``deltalake.write_deltalake(mode="overwrite", predicate="run = 'R' AND iteration = G",
  partition_by=["run", "iteration"])`` — Delta's replaceWhere: one atomic commit per stage in
  ``_delta_log``; on S3 with ``conditional_put=etag`` (SeaweedFS and AWS S3 honour ``If-None-Match``).

Reported per store: median seconds to commit one stage and to read one partition back (each with
its own reader), and what a *plain* engine sees — ``pyarrow.dataset(table, partitioning="hive")``,
which is how Athena/Glue, Spark and DuckDB read a Parquet prefix without a table format — after the
retried commit: the rows it counts against the true count, and the non-Parquet files under the table.

Needs ``pip install deltalake`` for the peer (not a flywheel dependency: this bench exists to decide whether it
should be); without it the bench says so in its result line.

    .venv/bin/python bench/bench_commit.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.seaweed import start_seaweed  # noqa: E402
from tasks.lake import Lake  # noqa: E402

RUN = "bench"


def scored(rows: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "prompt_id": np.arange(rows) // 8, "sample_idx": (np.arange(rows) % 8).astype(np.int32),
        "prompt": [f"What is {i % 97} + {i % 89}?" for i in range(rows)],
        "completion": [f"{(i * 7) % 200}" for i in range(rows)], "reward": rng.random(rows),
    })  # fmt: skip


def _median(fn, repeats: int) -> float:
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def staged_side(lake: Lake, frames: list[pl.DataFrame], parts: int, *, sharded: bool) -> dict:
    table = "samples" if sharded else "scored"

    def commit(i: int) -> None:
        n, uri = frames[i].height, lake.stage_uri(RUN, i + 1, table)
        shards = [frames[i].slice(k * n // parts, n // parts) for k in range(parts)]
        if not sharded:  # a stage computed in one process: parts uploaded into the partition, manifest last
            lake.write_stage(uri, shards)
            return
        lake.clear(uri)  # a sharded stage (Grow, scoring): parts staged as shards finish, moved in at commit
        lake.commit(uri, [lake.write_part(uri, k, shard) for k, shard in enumerate(shards)])

    out = {"commit_s": _median(commit, len(frames))}
    out["read_s"] = _median(lambda i: lake.read(lake.stage_uri(RUN, i + 1, table)), len(frames))
    retried = lake.stage_uri(RUN, 1, table)  # a retried stage: cleared (its manifest gone) and committed again
    lake.store.delete_prefix(lake.manifest_uri(retried).rsplit("/", 1)[0])
    commit(0)
    return out


def delta_side(uri: str, options: dict | None, frames: list[pl.DataFrame], parts: int) -> dict:
    from deltalake import DeltaTable, write_deltalake

    def commit(i: int) -> None:
        table = frames[i].with_columns(run=pl.lit(RUN), iteration=pl.lit(i + 1, pl.Int64)).to_arrow()
        n = table.num_rows
        batches = [b for k in range(parts) for b in table.slice(k * n // parts, n // parts).to_batches()]
        write_deltalake(uri, pa.Table.from_batches(batches), mode="overwrite", partition_by=["run", "iteration"],
                        predicate=f"run = '{RUN}' AND iteration = {i + 1}", storage_options=options)

    out = {"commit_s": _median(commit, len(frames))}
    out["read_s"] = _median(
        lambda i: DeltaTable(uri, storage_options=options).to_pyarrow_table(partitions=[("run", "=", RUN), ("iteration", "=", str(i + 1))]),
        len(frames),
    )
    commit(0)
    return out


def plain_view(filesystem, path: str) -> tuple[int, list[str]]:
    """Rows a plain hive-partitioned Parquet reader counts under ``path``, and the non-Parquet files there."""
    selector = pafs.FileSelector(path, recursive=True)
    files = [f.path for f in (filesystem or pafs.LocalFileSystem()).get_file_info(selector) if f.type == pafs.FileType.File]
    other = sorted({Path(f).name if "_delta_log" not in f else "_delta_log/*" for f in files if not f.endswith(".parquet")})
    dataset = ds.dataset(path, filesystem=filesystem, format="parquet", partitioning="hive",
                         exclude_invalid_files=True, ignore_prefixes=[".", "_"])
    return dataset.count_rows(), other


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="rows per stage (the demo's scored stage has a few hundred)")
    parser.add_argument("--parts", type=int, default=4, help="parts per stage (Grow shards)")
    parser.add_argument("--stages", type=int, default=7, help="stages committed per side (median reported)")
    args = parser.parse_args(argv)
    try:
        import deltalake
    except ImportError:  # the peer is optional: say so in the result line, as `make bench` expects one
        print("bench_commit compares against Delta Lake, which is not installed: pip install deltalake")
        print(json.dumps({"bench": "commit", "ratio": None, "ratio_means": "needs pip install deltalake", "target": "report"}))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_commit_"))
    frames = [scored(args.rows, seed) for seed in range(args.stages)]
    truth = sum(f.height for f in frames)
    server = start_seaweed(work / "seaweed", access_key=f"bench-{secrets.token_hex(4)}", secret_key=secrets.token_urlsafe(30),
                           die_with_parent=True)
    results = {}
    try:
        server.create_bucket("bench")
        env = server.aws_env()
        s3fs = pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_override=server.endpoint_url, region="us-east-1")
        delta_s3 = {"AWS_ENDPOINT_URL": server.endpoint_url, "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
                    "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"], "AWS_REGION": "us-east-1",
                    "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}
        s3_options = {"endpoint_url": server.endpoint_url, "region": "us-east-1"}
        import os

        os.environ.update(env)  # this process only; never printed
        sides = {
            ("local", "direct"): lambda: staged_side(Lake(str(work / "lake")), frames, args.parts, sharded=False),
            ("local", "staged"): lambda: staged_side(Lake(str(work / "lake")), frames, args.parts, sharded=True),
            ("local", "delta"): lambda: delta_side(str(work / "delta" / "scored"), None, frames, args.parts),
            ("s3", "direct"): lambda: staged_side(Lake("s3://bench/lake", s3_options), frames, args.parts, sharded=False),
            ("s3", "staged"): lambda: staged_side(Lake("s3://bench/lake", s3_options), frames, args.parts, sharded=True),
            ("s3", "delta"): lambda: delta_side("s3://bench/delta/scored", delta_s3, frames, args.parts),
        }
        where = {("local", "direct"): (None, str(work / "lake" / "scored")), ("local", "staged"): (None, str(work / "lake" / "samples")),
                 ("local", "delta"): (None, str(work / "delta" / "scored")),
                 ("s3", "direct"): (s3fs, "bench/lake/scored"), ("s3", "staged"): (s3fs, "bench/lake/samples"),
                 ("s3", "delta"): (s3fs, "bench/delta/scored")}
        for key, run in sides.items():
            out = run()
            out["plain_rows"], out["non_parquet"] = plain_view(*where[key])
            results[key] = out
    finally:
        server.stop(timeout=5)
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.stages} stages of {args.rows:,} rows in {args.parts} parts, then one stage committed again; "
          f"deltalake {deltalake.__version__}; medians")
    print(f"{'store':<7}{'protocol':<9}{'commit s':>10}{'read s':>9}{'plain-scan rows':>17}  non-Parquet under the table")
    for (store, side), r in results.items():
        print(f"{store:<7}{side:<9}{r['commit_s']:>10.3f}{r['read_s']:>9.3f}{r['plain_rows']:>11,} / {truth:,}  "
              f"{', '.join(r['non_parquet']) or '-'}")
    line = {"bench": "commit", "rows": args.rows, "parts": args.parts, "stages": args.stages, "true_rows": truth,
            "deltalake": deltalake.__version__}
    for (store, side), r in results.items():
        line |= {f"{store}_{side}_commit_s": round(r["commit_s"], 4), f"{store}_{side}_read_s": round(r["read_s"], 4),
                 f"{store}_{side}_plain_rows": r["plain_rows"], f"{store}_{side}_non_parquet": r["non_parquet"]}
    line |= {"ratio": round(results[("s3", "direct")]["commit_s"] / results[("s3", "delta")]["commit_s"], 3),
             "ratio_means": "flywheel (write_stage) / delta seconds per stage commit on S3", "target": "report"}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
