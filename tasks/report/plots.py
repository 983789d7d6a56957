"""The run's plots, drawn one way for both places that show them: the HTML report (``html``) and the
plots logged to MLflow after each iteration (``artifacts``).

- ``figure``: a matplotlib ``Figure`` with one set of axes, titled and labelled;
- ``steps``: the baseline and every evaluated Improve step of ``summary.json``, labelled ``0``, ``g.i``;
- ``lines``: one line per figure over those steps (the held-out curve, lengths, KL, ...);
- ``own_rewards`` and ``histograms``: the rewards of the policy's own samples, one histogram per series.

No pyplot: a ``Figure`` on the Agg backend needs no display and keeps no global state between the
threads that draw at once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from alignment.metrics import own

BINS = 20


def figure(width: float = 6.0, height: float = 3.0, *, title: str | None = None, xlabel: str | None = None,
           ylabel: str | None = None, grid: bool = False, constrained: bool = False):
    """A ``(Figure, Axes)`` of ``width`` x ``height`` inches at 100 dpi; ``grid`` draws a faint grid,
    ``constrained`` fits the labels inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained" if constrained else None)
    ax = fig.add_subplot()
    ax.set(**{k: v for k, v in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)) if v is not None})
    if grid:
        ax.grid(alpha=0.3)
    return fig, ax


def steps(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline (``label`` ``0``, promoted by definition) and every step with a held-out reward
    (``label`` ``g.i``), each as its ``summary.json`` row plus its ``label``."""
    out = []
    if b := summary.get("baseline"):
        out.append({"label": "0", "promoted": True, **b})
    out += [{"label": f"{r['iteration']}.{r['step']}", **r} for r in summary.get("iterations", []) if r.get("eval_reward") is not None]
    return out


def lines(ax, rows: list[dict[str, Any]], keys: dict[str, str], styles: dict[str, dict[str, Any]] | None = None) -> None:
    """One line per ``key`` of ``rows`` (labelled ``keys[key]``, round markers unless ``styles[key]`` says
    otherwise), in row order, ticked with each row's ``label``; a missing figure leaves a gap."""
    x = list(range(len(rows)))
    for key, label in keys.items():
        y = [math.nan if r.get(key) is None else r[key] for r in rows]
        ax.plot(x, y, **({"marker": "o"} | (styles or {}).get(key, {})), label=label)
    ax.set_xticks(x, [r["label"] for r in rows])


def own_rewards(frame: pl.DataFrame) -> np.ndarray:
    """The non-null rewards of the policy's own samples (``alignment.metrics.own``)."""
    return own(frame)["reward"].drop_nulls().to_numpy()


def histograms(ax, series: dict[str, np.ndarray], *, shares: bool = False, common_range: bool = False, **style: Any) -> None:
    """One ``BINS``-bin histogram per labelled series. ``shares`` weighs each sample ``1/len`` so series
    of different sizes compare; ``common_range`` bins every series over the range of all of them (one
    bin when every value is the same), so their bars line up. ``style`` goes to ``Axes.hist``."""
    bins, span = BINS, None
    if common_range and series:
        lo = min(float(np.min(v)) for v in series.values())
        hi = max(float(np.max(v)) for v in series.values())
        bins, span = (BINS, (lo, hi)) if hi > lo else (1, (lo, lo + 1))
    for label, values in series.items():
        weights = [1.0 / len(values)] * len(values) if shares else None
        ax.hist(values, bins=bins, range=span, weights=weights, label=label, **style)
