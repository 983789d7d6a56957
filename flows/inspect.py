"""``flywheel inspect URI``: what is in any part of the lake — a run, an iteration or one stage.

For every committed stage under the URI: row count, reward statistics and a histogram, the kept
fraction of filtered data against its scored parent, and example kept and dropped rows. Only
committed stages (with a manifest) are shown; an interrupted stage is invisible here as it is to
every reader.
"""

from __future__ import annotations

import re
from typing import Any

import polars as pl

from tasks.lake import MANIFEST, Lake, StageNotFound
from tasks.storage import normalize_uri

SHOW = ["prompt_id", "sample_idx", "prompt", "completion", "reference", "reward"]
_KEYS = re.compile(r"/(iteration|step)=(\d+)")


def _lake_for(uri: str) -> Lake:
    return Lake(uri)


def _stage_name(stage_uri: str) -> str:
    return stage_uri.rsplit("/iteration=", 1)[-1].split("/", 1)[-1] if "/iteration=" in stage_uri else stage_uri


def reward_stats(rewards: pl.Series, bins: int = 10) -> dict[str, Any]:
    """Mean, spread, quantiles and a fixed-width histogram of a reward column."""
    r = rewards.drop_nulls()
    if r.len() == 0:
        return {"count": 0}
    lo, hi = float(r.min()), float(r.max())
    width = (hi - lo) / bins if hi > lo else 1.0
    idx = ((r - lo) / width).floor().clip(0, bins - 1).cast(pl.Int64) if hi > lo else pl.Series([0] * r.len())
    counts = idx.value_counts().sort(idx.name)
    hist = [0] * bins
    for b, c in counts.iter_rows():
        hist[int(b)] = int(c)
    return {
        "count": r.len(), "mean": float(r.mean()), "std": float(r.std() or 0.0), "min": lo, "max": hi,
        "p50": float(r.quantile(0.5)), "p90": float(r.quantile(0.9)),
        "histogram": {"edges": [lo + i * width for i in range(bins + 1)] if hi > lo else [lo, hi], "counts": hist if hi > lo else [r.len()]},
    }


def _rows(frame: pl.DataFrame, limit: int) -> list[dict[str, Any]]:
    cols = [c for c in SHOW if c in frame.columns]
    return frame.select(cols).head(limit).to_dicts()


def inspect_stage(lake: Lake, stage_uri: str, limit: int) -> dict[str, Any]:
    m = lake.manifest(stage_uri)
    keys = {k: int(v) for k, v in _KEYS.findall(stage_uri)}
    out: dict[str, Any] = {"uri": stage_uri, "stage": _stage_name(stage_uri), **keys, "rows": m.rows, "manifest_sha256": m.sha256}
    raw = lake.get_json(f"{stage_uri}/{MANIFEST}")
    if raw.get("kind") in ("checkpoint", "base-model"):
        out.update(kind=raw["kind"], files=len(m.files), metrics=raw.get("metrics", {}))
        return out
    if raw.get("metrics"):
        out["metrics"] = raw["metrics"]
    frame = lake.read(stage_uri)
    if "reward" in frame.columns:
        out["reward"] = reward_stats(frame["reward"])
    out["sample_rows"] = _rows(frame, limit)
    if out["stage"].startswith("filtered") and m.parents:
        scored = lake.read(m.parents[0])
        out["scored_rows"] = scored.height
        out["kept_fraction"] = m.rows / scored.height if scored.height else 0.0
        if "threshold" in frame.columns and frame.height:
            out["threshold"] = float(frame["threshold"].min())
        dropped = scored.join(frame.select("prompt_id", "sample_idx"), on=["prompt_id", "sample_idx"], how="anti")
        out["dropped_rows"] = _rows(dropped.sort("reward", descending=True), limit)
    return out


def inspect_uri(uri: str, *, limit: int = 5) -> dict[str, Any]:
    """A JSON-able report of every committed stage under ``uri``."""
    uri = normalize_uri(uri)
    lake = _lake_for(uri)
    manifests = [u[: -len(MANIFEST) - 1] for u in lake.store.list(uri) if u.endswith("/" + MANIFEST)]
    if lake.store.exists(f"{uri}/{MANIFEST}"):
        manifests = [uri]
    if not manifests:
        raise StageNotFound(f"Nothing committed under {uri}: check the URI (a lake, run, iteration or stage).")
    stages = [inspect_stage(lake, s, limit) for s in sorted(manifests, key=_sort_key)]
    report: dict[str, Any] = {"uri": uri, "stages": stages}
    if lake.store.exists(f"{uri}/summary.json"):
        report["summary"] = lake.get_json(f"{uri}/summary.json")
    report["kept_by_step"] = [
        {"iteration": s.get("iteration"), "step": s.get("step"), "kept": s["rows"], "scored": s.get("scored_rows"),
         "kept_fraction": s.get("kept_fraction"), "threshold": s.get("threshold")}
        for s in stages if s["stage"].startswith("filtered")
    ]
    return report


def _sort_key(stage_uri: str) -> tuple:
    keys = dict(_KEYS.findall(stage_uri))
    prefix = stage_uri.split("/iteration=", 1)[0]
    return (prefix, int(keys.get("iteration", -1)), _stage_name(stage_uri).split("/")[0], int(keys.get("step", -1)))


def _histogram_line(stats: dict[str, Any], width: int = 30) -> str:
    counts = stats["histogram"]["counts"]
    top = max(counts) or 1
    bars = " ▁▂▃▄▅▆▇█"
    return "".join(bars[min(8, round(8 * c / top))] for c in counts)


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"{report['uri']}"]
    for s in report["stages"]:
        where = f"iteration={s.get('iteration', '-')}"
        head = f"  {where:<14} {s['stage']:<22} rows={s['rows']:<7}"
        if s.get("kind"):
            head += f" {s['kind']} ({s['files']} files)"
        if "kept_fraction" in s:
            head += f" kept={s['kept_fraction']:.1%} of {s['scored_rows']}" + (f" tau={s['threshold']:.3f}" if "threshold" in s else "")
        if "metrics" in s and s.get("kind") is None:
            head += " " + " ".join(f"{k}={v:.3f}" for k, v in s["metrics"].items())
        lines.append(head)
        r = s.get("reward")
        if r and r.get("count"):
            lines.append(f"      reward mean={r['mean']:.3f} std={r['std']:.3f} min={r['min']:.3f} max={r['max']:.3f} |{_histogram_line(r)}|")
    if report["kept_by_step"]:
        lines.append("  kept per Improve step:")
        for k in report["kept_by_step"]:
            lines.append(f"    iteration={k['iteration']} step={k['step']} kept {k['kept']} of {k['scored']} ({k['kept_fraction']:.1%})")
    stages = report["stages"]
    last = next((s for s in reversed(stages) if s.get("dropped_rows") is not None), None)
    last = last or next((s for s in reversed(stages) if s.get("sample_rows")), None)
    if last is not None:
        lines.append(f"  {'kept' if 'dropped_rows' in last else 'sample'} rows of {last['stage']} (iteration={last.get('iteration', '-')}):")
        lines += [f"    {row}" for row in last["sample_rows"]]
        if last.get("dropped_rows"):
            lines.append("  dropped rows (best first):")
            lines += [f"    {row}" for row in last["dropped_rows"]]
    return "\n".join(lines)
