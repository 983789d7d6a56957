"""``flywheel sql`` and ``flywheel runs``: the lake's stages as tables to query, and its runs at a glance.

Every committed stage of every run is one table per stage name — ``prompts``, ``eval_prompts``,
``labelled``, ``samples``, ``scored``, ``filtered``, ``pairs``, ``eval`` — with ``run``,
``iteration`` and ``step`` columns added from where the stage lies, so one query spans runs and
iterations::

    flywheel sql "SELECT run, iteration, avg(reward) AS reward FROM scored GROUP BY run, iteration ORDER BY 1, 2"
    flywheel sql "SELECT finish_reason, count(*) FROM samples GROUP BY 1" --format json
    flywheel sql "SELECT run, iteration, step, drop_reason, n FROM drops" --lake s3://bucket/lake

Each table is the lake's own table prefix (``{lake}/scored``, hive-partitioned by ``run``,
``iteration`` and ``step``), read through its manifests: only the parts a committed partition lists
are read (an interrupted stage is invisible, as it is to every flywheel reader), lazily, with polars'
SQL engine; the same works on ``file://`` and ``s3://``.
``decisions`` holds every scored row's fate in each Improve step (``decision``, ``reason``,
``threshold``), so "why was this row dropped" is a join with ``scored``; ``drops`` is the filter's
own count of drops per reason.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl

from alignment.errors import UserError
from tasks.lake import Lake
from tasks.lake import LEASE_FILE, RUN_FILE, normalize_uri

FORMATS = ("table", "json", "csv", "parquet")


class QueryError(UserError):
    """A query the lake's tables cannot answer, a lake that is not there, or an output that cannot be written."""


def open_lake(uri: str) -> Lake:
    """The lake at ``uri``, for reading: one sentence when there is none there.

    A ``file://`` lake is a folder holding ``runs/`` (every run records itself there first); an ``s3://``
    lake's bucket, endpoint and credentials are checked by one request.
    """
    if uri.startswith("s3://") and not uri[len("s3://"):].strip("/"):
        raise QueryError(f"The lake URI {uri!r} names no bucket: use s3://BUCKET/PREFIX.")
    lake = Lake(normalize_uri(uri))
    folder = lake.store.local_path(lake.uri)
    if folder is None:
        lake.store.exists(f"{lake.uri}/{RUN_FILE}")  # a missing bucket, a refused key, a stopped server: one sentence
        return lake
    if not folder.is_dir():
        said = "is not a folder" if folder.exists() else "does not exist"
        raise QueryError(f"No lake at {lake.uri}: {folder} {said}; pass --lake with the lake a run wrote (the recipe's lake).")
    if not (folder / "runs").is_dir():
        raise QueryError(
            f"No lake at {lake.uri}: the folder holds no runs/ (each run records itself there); "
            "pass --lake with the lake a run wrote (the recipe's lake)."
        )
    return lake


def check_out(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a file this process can write (its folder is made if missing), checked before any work."""
    out = Path(path)
    if out.is_dir():
        raise QueryError(f"{option} {path} is a folder; give a file name.")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except OSError as exc:
        raise QueryError(f"{option} {path} cannot be written ({exc.strerror or exc}); choose a path in a folder you can write.") from None
    if not existed:
        out.unlink()
    return out


def committed_stages(lake: Lake) -> list[dict[str, Any]]:
    """Every committed stage in the lake: its table name, run, iteration, step and manifest."""
    out = []
    for a in lake.committed():
        manifest = json.loads(lake.store.get(a.manifest_uri))
        out.append({"table": a.stage, "run": a.run, "iteration": a.iteration, "step": a.step, "uri": a.uri, "manifest": manifest})
    return out


def tables(lake: Lake) -> dict[str, pl.LazyFrame]:
    """One lazy frame per stage name, over the committed parts of every run and iteration."""
    frames: dict[str, list[pl.LazyFrame]] = {}
    options = lake.store.storage_options()
    stages = committed_stages(lake)
    for s in stages:
        files = [f"{s['uri']}/{f['name']}" for f in s["manifest"].get("files", [])]
        if not files:
            continue
        paths = [_readable(p) for p in files]
        scan = pl.scan_parquet(paths, storage_options=options) if options else pl.scan_parquet(paths)
        frames.setdefault(s["table"], []).append(scan.with_columns(
            pl.lit(s["run"]).alias("run"), pl.lit(s["iteration"], pl.Int64).alias("iteration"),
            pl.lit(s["step"], pl.Int64).alias("step"),
        ))  # fmt: skip
    out = {name: pl.concat(parts, how="diagonal_relaxed") for name, parts in frames.items()}
    drops = [
        {"run": s["run"], "iteration": s["iteration"], "step": 1 if s["step"] is None else s["step"], "drop_reason": reason, "n": n}
        for s in stages if s["table"] in ("filtered", "pairs", "groups")
        for reason, n in (s["manifest"].get("dropped") or {}).items()
    ]  # fmt: skip
    schema = {"run": pl.Utf8, "iteration": pl.Int64, "step": pl.Int64, "drop_reason": pl.Utf8, "n": pl.Int64}
    out["drops"] = pl.DataFrame(drops, schema=schema).lazy()
    return out


def _readable(uri: str) -> str:
    return uri.removeprefix("file://")


def query(lake: Lake, sql: str) -> pl.DataFrame:
    """Run ``sql`` over the lake's tables; a query they cannot answer is one sentence."""
    if not sql.strip():
        raise QueryError('The query is empty; give one SELECT, e.g. "SELECT run, count(*) FROM scored GROUP BY run".')
    available = tables(lake)
    ctx = pl.SQLContext(available, eager=False)
    try:
        return ctx.execute(sql).collect()
    except Exception as exc:  # polars raises SQL, column and table errors of several types
        detail = " ".join(str(exc).split("Resolved plan")[0].split())[:300].rstrip(".;: ")
        raise QueryError(
            f"The query failed ({type(exc).__name__}: {detail}); the tables are {', '.join(sorted(available))}, "
            "each with run, iteration and step columns."
        ) from None


def render(frame: pl.DataFrame, fmt: str, width: int | None = None) -> bytes:
    """The result as a printed table, JSON rows, CSV or Parquet bytes. The table fits ``width`` characters (a
    terminal's) with the whole columns that fit (``_table``); without one (a pipe, a file) each row is one line."""
    if fmt == "json":
        return (json.dumps(frame.to_dicts(), default=str) + "\n").encode()
    if fmt == "csv":  # CSV holds no nested values: a list or struct column (GRPO's per-token log-probs) is its JSON text
        nested = [c for c, dtype in frame.schema.items() if dtype.is_nested()]
        frame = frame.with_columns(pl.Series(c, [None if v is None else json.dumps(v) for v in frame[c].to_list()], dtype=pl.String)
                                   for c in nested)  # fmt: skip
        return frame.write_csv().encode()
    if fmt == "parquet":
        buf = io.BytesIO()
        frame.write_parquet(buf)
        return buf.getvalue()
    return (_table(frame, width) + "\n").encode()


def _table(frame: pl.DataFrame, width: int | None) -> str:
    """``frame`` as a printed table. Within ``width`` it shows as many whole columns as fit, the first and the
    last with ``…`` between (as DuckDB's shell does), rather than wrapping every cell to a few characters."""
    settings = {"tbl_rows": 200, "fmt_str_lengths": 60, "tbl_hide_dataframe_shape": True}
    with pl.Config(**settings, tbl_cols=-1, tbl_width_chars=65_535):
        table = str(frame)
    if width is None or max(map(len, table.splitlines()), default=0) <= width or frame.width < 3:
        return table
    # Each column's printed width, read off the top border ┌───┬────┐ of the unwrapped table.
    sizes = [len(part) + 1 for part in table.splitlines()[0][1:-1].split("┬")]
    n, shown = len(sizes), 2
    for k in range(n - 1, 1, -1):  # the first ceil(k/2) and the last floor(k/2) columns, and the … column
        if sum(sizes[: (k + 1) // 2]) + sum(sizes[n - k // 2 :]) + 5 <= width:
            shown = k
            break
    with pl.Config(**settings, tbl_cols=shown, tbl_width_chars=width):
        return str(frame)


def runs(lake: Lake) -> list[dict[str, Any]]:
    """The runs in the lake: status (running / finished / unfinished), iterations, the run's best held-out reward
    (its baseline's or an iteration's), the model's champion when the run ended, start time."""
    root = f"{lake.uri}/runs/"
    names = sorted({u[len(root) :].split("/", 1)[0] for u in lake.store.list(root.rstrip("/")) if u.endswith(("/" + RUN_FILE, "/_manifest.json"))})
    rows = []
    for run in names:
        base = lake.run_uri(run)
        summary = _json(lake, f"{base}/summary.json") or {}
        identity = _json(lake, f"{base}/{RUN_FILE}") or {}
        lease = _json(lake, f"{base}/{LEASE_FILE}") or {}
        live = bool(lease) and not lease.get("released") and float(lease.get("expires_at") or 0) > time.time()
        status = "running" if live else ("finished" if summary.get("stopped") else "unfinished")
        champion = summary.get("champion") or {}
        rows.append({
            "run": run, "status": status, "algorithm": summary.get("algorithm"),
            "iterations": max((r.get("iteration", 0) for r in summary.get("iterations", [])), default=0),
            "best_reward": max((r["eval_reward"] for r in [summary.get("baseline") or {}, *summary.get("iterations", [])]
                                if r.get("eval_reward") is not None), default=None),
            "champion": f"{champion['model_name']} v{champion['version']}" if champion else None,
            "champion_reward": champion.get("eval_reward"), "started": identity.get("created_at"),
        })  # fmt: skip
    return rows


def _json(lake: Lake, uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(lake.store.get(uri)) if lake.store.exists(uri) else None
    except (ValueError, OSError):
        return None


def write(data: bytes, out: str | None) -> None:
    if out:
        with open(out, "wb") as fh:
            fh.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
