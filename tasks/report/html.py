"""``flywheel report RUN``: one self-contained HTML file that shows a run's turns of the flywheel.

    flywheel report RUN [--lake file://./lake] [--out RUN-report.html]

It reads the run's ``summary.json`` and its committed stages (any lake: ``file://`` or ``s3://``)
and draws, as inline base64 PNGs (matplotlib, no display), one section each: held-out reward and
accuracy per step with the champion marked, kept fraction and tau, completion length and
truncation, KL to the initial policy, reward histograms per iteration (grown vs kept), Grow
throughput and seconds per stage, the promotion checks, a few kept and dropped samples with the reason
each was dropped, and a GRPO run's per-step diagnostics. A finished run also logs it as an MLflow artifact
of its parent run.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import polars as pl

from alignment.metrics import own
from tasks.report import plots

SECTIONS = {
    "heldout": "Held-out reward and accuracy",
    "filter": "Selection fraction and threshold",
    "length": "Completion length and truncation",
    "kl": "KL to the initial policy",
    "histograms": "Reward per iteration: grown vs kept",
    "throughput": "Throughput and seconds per stage",
    "promotion": "Promotion checks",
    "samples": "Selection and dropped samples",
}
GRPO_SECTION = {"grpo": "GRPO steps: rewards, clipping, KL, entropy, loss"}  # a GRPO run's only
STAGES = ("grow", "score", "filter", "pair", "groups", "train", "evaluate", "register")
SAMPLES_SHOWN = 5


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _line_plot(rows, keys: dict[str, str], ylabel: str, *, mark_champion: bool = False) -> str:
    fig, ax = plots.figure(xlabel="iteration.step", ylabel=ylabel, grid=True)
    plots.lines(ax, rows, keys)
    if mark_champion:
        promoted = [i for i, r in enumerate(rows) if r.get("promoted")]
        ax.scatter(promoted, [rows[i].get("eval_reward") for i in promoted], s=160, facecolors="none",
                   edgecolors="gold", linewidths=2, label="promoted (champion)", zorder=3)
    ax.legend(fontsize=8)
    return _png(fig)


def _bar_plot(rows, keys: list[str], ylabel: str, names: dict[str, str] | None = None) -> str:
    fig, ax = plots.figure(xlabel="iteration.step", ylabel=ylabel)
    bottom = [0.0] * len(rows)
    for key in keys:
        values = [r.get(key) or 0.0 for r in rows]
        ax.bar([r["label"] for r in rows], values, bottom=bottom, label=(names or {}).get(key, key.removeprefix("seconds_")))
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    ax.legend(fontsize=8)
    return _png(fig)


def _training_world(steps: list[dict[str, Any]]) -> str:
    """The stage-time chart's name for training: how many ranks trained, with which strategy, and their peak memory."""
    ranked = [r for r in steps if (r.get("world_size") or 1) > 1]
    if not ranked:
        return "train"
    last = ranked[-1]
    peaks = ", ".join(f"{p:,.0f}" for p in last.get("train_peak_memory_mib") or [])
    return f"train ({last['world_size']} ranks, {last.get('strategy')}; peak MiB per rank {peaks})"


def _histograms(frames: dict[int, tuple[pl.DataFrame, pl.DataFrame | None]]) -> list[str]:
    """Per iteration: the rewards of the policy's own samples, grown and kept."""
    images = []
    for g, (grown, kept) in sorted(frames.items()):
        fig, ax = plots.figure(5.0, 2.6, title=f"iteration {g}", xlabel="reward")
        r = plots.own_rewards(grown)
        series = {f"grown ({len(r)})": r}
        if kept is not None and "reward" in kept.columns:
            k = plots.own_rewards(kept)
            series[f"kept ({len(k)})"] = k
        plots.histograms(ax, series, alpha=0.6)
        ax.legend(fontsize=8)
        images.append(_png(fig))
    return images


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _load(lake, run: str, doc: dict[str, Any]):
    """Per iteration: (scored, the last step's filtered stage or None) and the last (iteration, step) with a
    filtered stage. A GRPO iteration scores and keeps groups per step: its steps' scored stages and its
    ``groups`` stages (the informative groups it trained on) stand for the two."""
    frames: dict[int, tuple[pl.DataFrame, pl.DataFrame | None]] = {}
    last: tuple[int, int] | None = None
    for r in doc.get("iterations", []):
        g, i = r["iteration"], r["step"]
        if r.get("steps"):  # GRPO
            grown = _read_all(lake, [lake.stage_uri(run, g, "scored", s["step"]) for s in r["steps"]])
            if grown is not None:
                frames[g] = (grown, _read_all(lake, [lake.stage_uri(run, g, "groups", s["step"]) for s in r["steps"]]))
            continue
        scored_uri = lake.stage_uri(run, g, "scored")
        if not lake.is_done(scored_uri):
            continue
        kept_uri = lake.stage_uri(run, g, "filtered", i)
        kept = lake.read(kept_uri) if lake.is_done(kept_uri) else None
        frames[g] = (lake.read(scored_uri), kept)
        if kept is not None:
            last = (g, i)
    return frames, last


def _read_all(lake, uris: list[str]) -> pl.DataFrame | None:
    """The committed stages among ``uris`` as one frame; None when none is committed."""
    frames = [lake.read(uri) for uri in uris if lake.is_done(uri)]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def _samples_section(lake, run: str, frames, last) -> str:
    if last is None:
        return ("<p>No filtered stage (iterative DPO trains on pairs, GRPO on groups; see those stages with "
                "flywheel inspect).</p>")
    g, i = last
    scored, kept = frames[g]
    # Each row's fate as the filter recorded it (the decisions stage), for the policy's own samples.
    fates = lake.read(lake.stage_uri(run, g, "decisions", i)).filter(pl.col("decision") == "dropped")
    dropped = own(scored).join(fates.select("prompt_id", "sample_idx", "reason"), on=["prompt_id", "sample_idx"])
    cols = ["prompt", "completion", "reference", "reward"]
    own_kept = own(kept).head(SAMPLES_SHOWN)
    # a few of each reason, so every reason the filter used is seen
    shown = pl.concat([dropped.filter(pl.col("reason") == r).head(2)
                       for r in ("truncated", "duplicate", "below_threshold", "not_top_k")])
    return (f"<h3>Selection (iteration {g}, step {i})</h3>" + _table(cols, [list(r) for r in own_kept.select(cols).iter_rows()])
            + f"<h3>Dropped (iteration {g}, step {i})</h3>"
            + _table([*cols, "reason"], [list(r) for r in shown.select(*cols, "reason").iter_rows()]))


def build_report(lake, run: str) -> str:
    """The report of ``run`` in ``lake`` (a ``tasks.lake.Lake``), as one HTML string."""
    doc = lake.get_json(f"{lake.run_uri(run)}/summary.json")
    rows = plots.steps(doc)
    steps = [r for r in rows if r["label"] != "0"]
    frames, last = _load(lake, run, doc)
    body: dict[str, str] = {}
    body["heldout"] = _line_plot(rows, {"eval_reward": "held-out reward", "eval_accuracy": "accuracy",
                                        "eval_train_reward": "training reward on held-out"}, "reward", mark_champion=True)
    body["filter"] = _line_plot(steps, {"kept_fraction": "kept fraction (own samples)", "tau": "tau",
                                        "prompt_coverage": "prompt coverage", "pass_at_1": "pass@1", "pass_at_n": "pass@N"}, "")
    body["length"] = (_line_plot(rows, {"grown_length_mean": "grown", "kept_length_mean": "kept", "eval_length": "held-out"}, "tokens")
                      + _line_plot(rows, {"grown_truncated": "grown", "eval_truncated": "held-out"}, "truncated share"))
    body["kl"] = _line_plot(rows, {"eval_kl": "per-token KL (k1, greedy held-out completions)"}, "nats per token")
    body["histograms"] = "".join(_histograms(frames)) or "<p>No scored stage.</p>"
    stage_keys = [f"seconds_{s}" for s in STAGES if any(r.get(f"seconds_{s}") for r in steps)]
    body["throughput"] = (_line_plot(steps, {"grow_samples_per_s": "samples/s", "grow_tokens_per_s": "tokens/s"}, "per second")
                          + _bar_plot(steps, stage_keys, "seconds", {"seconds_train": _training_world(steps)}))
    checks = sorted({c for r in steps for c in (r.get("promotion") or {})})
    body["promotion"] = _table(
        ["step", "version", "promoted", *checks],
        [[r["label"], r.get("model_version"), "yes" if r.get("promoted") else "no: " + ", ".join(r.get("blocked_by") or []),
          *[_verdict((r.get("promotion") or {}).get(c)) for c in checks]] for r in steps],
    )
    body["samples"] = _samples_section(lake, run, frames, last)
    if grpo := [{"label": f"{r['iteration']}.{s['step']}", **s} for r in doc.get("iterations", []) for s in r.get("steps") or []]:
        body["grpo"] = (
            _line_plot(grpo, {"reward_mean": "reward mean", "reward_std": "reward std",
                              "frac_reward_zero_std": "share of prompts whose rewards are equal"}, "")
            + _line_plot(grpo, {"clip_ratio_low": "clipped low", "clip_ratio_high": "clipped high", "kl": "KL to pi_ref (k3)",
                                "entropy": "entropy"}, "per token")
            + _line_plot(grpo, {"pg_loss": "policy-gradient loss", "grad_norm": "grad norm"}, "")
        )  # fmt: skip
    champ = doc.get("champion") or {}
    sections = "".join(f'<section id="{key}"><h2>{html.escape(title)}</h2>{body[key]}</section>'
                       for key, title in {**SECTIONS, **GRPO_SECTION}.items() if key in body)  # fmt: skip
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>flywheel report: {html.escape(run)}</title><style>{CSS}</style></head><body>"
        f"<h1>Run {html.escape(run)}</h1><p>{html.escape(doc.get('algorithm', ''))}, recipe {html.escape(str(doc.get('recipe')))}; "
        f"champion: version {html.escape(str(champ.get('version')))} (held-out reward {champ.get('eval_reward')}); "
        f"stopped: {html.escape(str(doc.get('stopped')))}</p>{sections}</body></html>"
    )


def _verdict(check: dict | None) -> str:
    if not check:
        return "-"
    value = "-" if check["value"] is None else f"{check['value']:.3f}"
    return f"{'pass' if check['passed'] else 'FAIL'} ({value} vs {check['limit']})"


CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px}section{margin-bottom:2em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
img{margin:4px;vertical-align:top}"""


def write_report(lake_uri: str, run: str, out: str | Path | None = None, s3: dict[str, Any] | None = None) -> Path:
    """Write the report of ``run`` to ``out`` (default ``RUN-report.html``) and return its path."""
    from tasks.lake import Lake

    path = Path(out or f"{run}-report.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(Lake(lake_uri, s3), run), encoding="utf-8")
    return path
