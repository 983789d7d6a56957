"""``flywheel inspect URI``: what is in any part of the lake — a lake, a run, a table or one partition.

The URI names what to show::

    file://./lake                                   every run
    file://./lake/runs/RUN[/iteration=G]            one run (or one iteration of it), every stage
    file://./lake/scored[/run=RUN[/iteration=G]]    one table (or a partition of it)
    file://./lake/models/RUN[/iteration=G/...]      a run's checkpoints

For every committed stage it selects: row count, reward statistics and a histogram, the kept fraction
of a selection (ReST's ``filtered``, GRPO's ``groups``) against its scored parent, each sample's fate
(``decisions``: kept, or the reason it was dropped), the mean of GRPO's per-update diagnostics
(``updates``), and example kept and dropped rows. Only committed stages (with a manifest) are shown; an
interrupted stage is invisible here as it is to every reader.
"""

from __future__ import annotations

import re
from typing import Any

import polars as pl

from alignment.metrics import describe
from tasks.lake import MANIFEST, MODELS, TABLES, Address, Lake, StageNotFound
from tasks.lake import normalize_uri

SHOW = ["prompt_id", "sample_idx", "prompt", "completion", "chosen", "rejected", "reference", "reward", "chosen_reward",
        "rejected_reward", "advantage", "reason"]
SELECTIONS = ("filtered", "groups")  # the rows a step trains on, chosen from its scored parent (manifest parents[0])
_UPDATE_MEANS = ("loss", "pg_loss", "kl", "entropy", "clip_ratio_region", "grad_norm")
_KEYS = r"(?:/iteration=(?P<iteration>\d+)(?:/(?P<model>{models}))?(?:/step=(?P<step>\d+))?)?/?"
_SELECTIONS = [
    re.compile(r"(?P<root>.+?)/runs/(?P<run>[^/]+)" + _KEYS.format(models="(?!)")),
    re.compile(rf"(?P<root>.+)/(?P<table>{'|'.join(TABLES)})(?:/run=(?P<run>[^/]+)" + _KEYS.format(models="(?!)") + ")?/?"),
    re.compile(r"(?P<root>.+?)/(?P<models>models)/(?P<run>[^/]+)" + _KEYS.format(models="|".join(MODELS))),
]


def select(uri: str) -> tuple[Lake, dict[str, Any]]:
    """The lake a URI lies in and what of it the URI names (run, table, model, iteration, step)."""
    uri = normalize_uri(uri).rstrip("/")
    for pattern in _SELECTIONS:
        m = pattern.fullmatch(uri)
        if m:
            keys = {k: v for k, v in m.groupdict().items() if v is not None and k != "root"}
            return Lake(m["root"]), {k: int(v) if k in ("iteration", "step") else v for k, v in keys.items()}
    return Lake(uri), {}


def _selected(a: Address, selection: dict[str, Any]) -> bool:
    if "table" in selection and a.stage != selection["table"]:
        return False
    if "model" in selection and a.stage != selection["model"]:
        return False
    if "models" in selection and a.is_table:  # {lake}/models/RUN names the run's checkpoints, not its tables
        return False
    return all(getattr(a, k) == selection[k] for k in ("run", "iteration", "step") if k in selection)


def reward_stats(rewards: pl.Series, bins: int = 10) -> dict[str, Any]:
    """Mean, spread, quantiles (values that occur) and a fixed-width histogram of a reward column."""
    d = describe(rewards, interpolation="nearest")
    if d["count"] == 0:
        return {"count": 0}
    r, lo, hi = rewards.drop_nulls(), d["min"], d["max"]
    width = (hi - lo) / bins if hi > lo else 1.0
    idx = ((r - lo) / width).floor().clip(0, bins - 1).cast(pl.Int64) if hi > lo else pl.Series([0] * r.len())
    counts = idx.value_counts().sort(idx.name)
    hist = [0] * bins
    for b, c in counts.iter_rows():
        hist[int(b)] = int(c)
    return {
        "count": d["count"], "mean": d["mean"], "std": d["std"] or 0.0, "min": lo, "max": hi, "p50": d["p50"], "p90": d["p90"],
        "histogram": {"edges": [lo + i * width for i in range(bins + 1)] if hi > lo else [lo, hi], "counts": hist if hi > lo else [r.len()]},
    }


def _rows(frame: pl.DataFrame, limit: int) -> list[dict[str, Any]]:
    cols = [c for c in SHOW if c in frame.columns]
    return frame.select(cols).head(limit).to_dicts()


def inspect_stage(lake: Lake, stage_uri: str, limit: int) -> dict[str, Any]:
    m, a = lake.manifest(stage_uri), lake.address_of(stage_uri)
    keys = {"run": a.run, "iteration": a.iteration} | ({"step": a.step} if a.step is not None else {})
    out: dict[str, Any] = {"uri": stage_uri, "stage": a.label, **keys, "rows": m.rows, "manifest_sha256": m.sha256}
    raw = lake.manifest_doc(stage_uri)
    if raw.get("kind") in ("checkpoint", "base-model"):
        out.update(kind=raw["kind"], files=len(m.files), metrics=raw.get("metrics", {}))
        return out
    if raw.get("metrics"):
        out["metrics"] = raw["metrics"]
    # The stage's own settings as its manifest recorded them (a filter's threshold, a pairing rule, ...).
    settings = {k: v for k, v in (raw.get("config") or {}).items()
                if k not in keys and isinstance(v, bool | int | float | str) and not str(v).startswith(("file://", "s3://"))}
    if settings:
        out["settings"] = settings
    frame = lake.read(stage_uri)
    if "reward" in frame.columns:
        out["reward"] = reward_stats(frame["reward"])
    if a.stage == "decisions":  # each sample's fate: how many were kept, and how many each reason dropped
        fates = frame.select(pl.when(pl.col("decision") == "kept").then(pl.lit("kept")).otherwise(pl.col("reason")).alias("fate"))
        out["fates"] = dict(sorted(fates["fate"].fill_null("dropped").value_counts().iter_rows(), key=lambda kv: kv[0] != "kept"))
    if a.stage == "updates":  # GRPO's optimiser updates of one step: their mean diagnostics
        means = {c: frame[c].mean() for c in _UPDATE_MEANS if c in frame.columns}
        out["means"] = {c: v for c, v in means.items() if v is not None}  # a figure a run did not record (kl at beta 0) is left out
    out["sample_rows"] = _rows(frame, limit)
    if a.stage in SELECTIONS and m.parents:
        scored = lake.read(m.parents[0])
        out["scored_rows"] = scored.height
        out["kept_fraction"] = m.rows / scored.height if scored.height else 0.0
        dropped = scored.join(frame.select("prompt_id", "sample_idx"), on=["prompt_id", "sample_idx"], how="anti")
        decisions = lake.stage_uri(a.run, a.iteration, "decisions", a.step)
        if lake.is_done(decisions):  # why each was dropped
            reasons = lake.read(decisions).select("prompt_id", "sample_idx", "reason")
            dropped = dropped.join(reasons, on=["prompt_id", "sample_idx"], how="left")
        out["dropped_rows"] = _rows(dropped.sort("reward", descending=True), limit)
    return out


def inspect_uri(uri: str, *, limit: int = 5) -> dict[str, Any]:
    """A JSON-able report of every committed stage under ``uri``."""
    uri = normalize_uri(uri).rstrip("/")
    lake, selection = select(uri)
    run = selection.get("run")
    found = lake.committed(run) if "models" not in selection else []
    if "table" not in selection:  # the run's checkpoints too
        models = f"{lake.uri}/models" + (f"/{run}" if run else "")
        found += [a for u in lake.store.list(models) if u.endswith("/" + MANIFEST) and (a := lake.address(u[: -len(MANIFEST) - 1]))]
    chosen = sorted((a for a in found if _selected(a, selection)), key=_sort_key)
    if not chosen:
        raise StageNotFound(
            f"Nothing committed under {uri}: check the URI (a lake, {{lake}}/runs/RUN, a table such as {{lake}}/scored, "
            "or a partition such as {lake}/scored/run=RUN/iteration=1); `flywheel runs` lists the runs."
        )
    stages = [inspect_stage(lake, a.uri, limit) for a in chosen]
    report: dict[str, Any] = {"uri": uri, "stages": stages}
    if run and set(selection) <= {"run", "iteration"} and lake.store.exists(f"{lake.run_uri(run)}/summary.json"):
        report["summary"] = lake.get_json(f"{lake.run_uri(run)}/summary.json")
    report["kept_by_step"] = [
        {"iteration": s.get("iteration"), "step": s.get("step"), "kept": s["rows"], "scored": s.get("scored_rows"),
         "kept_fraction": s.get("kept_fraction"), "settings": s.get("settings", {})}
        for s in stages if s["stage"].split("/")[0] in SELECTIONS
    ]
    return report


def _pipeline() -> dict[str, int]:
    """Each stage's place in a step: the order of ``TABLES``, with the base model after the inputs and a
    step's checkpoint before its evaluation (so a table added to the lake finds its place)."""
    order = list(TABLES)
    order.insert(order.index("samples"), "base")
    order.insert(order.index("eval"), "checkpoint")
    return {name: i for i, name in enumerate(order)}


_ORDER = _pipeline()


def _sort_key(a: Address) -> tuple:
    return (a.run, a.iteration, -1 if a.step is None else a.step, _ORDER.get(a.stage, 99))


def _histogram_line(stats: dict[str, Any], width: int = 30) -> str:
    counts = stats["histogram"]["counts"]
    top = max(counts) or 1
    bars = " ▁▂▃▄▅▆▇█"
    return "".join(bars[min(8, round(8 * c / top))] for c in counts)


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"{report['uri']}"]
    for s in report["stages"]:
        where = f"{s['run']} iteration={s.get('iteration', '-')}"
        head = f"  {where:<14} {s['stage']:<22} rows={s['rows']:<7}"
        if s.get("kind"):
            head += f" {s['kind']} ({s['files']} files)"
            head += "".join(f" {k}={v:.4g}" for k, v in (s.get("metrics") or {}).items() if isinstance(v, int | float))  # its training
        if "kept_fraction" in s:
            head += f" kept={s['kept_fraction']:.1%} of {s['scored_rows']}"
        if s["stage"].startswith(("filtered", "pairs")) and s.get("settings"):  # the rule that chose these rows
            head += " " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s["settings"].items())
        if "metrics" in s and s.get("kind") is None:
            head += " " + " ".join(f"{k}={v:.3f}" for k, v in s["metrics"].items())
        if s.get("fates"):
            head += " " + " ".join(f"{fate}={n}" for fate, n in s["fates"].items())
        if s.get("means"):
            head += " mean " + " ".join(f"{k}={v:.4g}" for k, v in s["means"].items())
        lines.append(head)
        r = s.get("reward")
        if r and r.get("count"):
            lines.append(f"      reward mean={r['mean']:.3f} std={r['std']:.3f} min={r['min']:.3f} max={r['max']:.3f} |{_histogram_line(r)}|")
    if report["kept_by_step"]:
        lines.append("  kept per step:")
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
