"""Compare the loops and losses on one task, on the same seeds: a markdown table for the README.

    python -m flows.compare recipes/arithmetic-dpo.yaml --rest recipes/arithmetic-rest.yaml --losses dpo,ipo
    python -m flows.compare recipes/arithmetic-dpo.yaml --grpo recipes/arithmetic-grpo.yaml --set seed=1

Rows: the warm start alone (``grow_steps=0``), ReST, iterative DPO once per loss, then GRPO. Each row is
a full flywheel run in its own lake folder under ``--out`` (``--losses`` defaults to the losses the
loss table marks ``compared``); the table reports how many completions the run grew, the final policy's
held-out accuracy (the latest iterate for DPO and GRPO, the best adopted step for ReST), the champion's,
and the run's wall time. Every loop grows the same number of completions: the GRPO row samples
``task.n_prompts / grpo.steps_per_iteration`` prompts per step, so that each iteration's M steps grow as
many as one Grow step of ReST or DPO (its recipe's own ``prompts_per_step`` may be larger).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from alignment.errors import UserError
from alignment.loss_table import COMPARED, LOSSES
from alignment.metrics import is_policy_sample
from alignment.recipe import load_recipe


def _run(recipe_path: str, overrides: list[str], name: str) -> tuple[dict, float]:
    from flows.run import run_recipe

    recipe = load_recipe(recipe_path, overrides)
    t0 = time.monotonic()
    summary = run_recipe(recipe, name)
    return summary, time.monotonic() - t0


def _grown(summary: dict) -> int:
    """Completions the run sampled from its policies (labelled rows left out), from its scored stages."""
    from tasks.lake import Lake

    lake = Lake(summary["lake"])
    return sum(lake.read(a.uri).filter(is_policy_sample()).height for a in lake.committed(summary["run"]) if a.stage == "scored")


def _final(summary: dict) -> float:
    rows = [r for r in summary["iterations"] if r.get("eval_accuracy") is not None]
    if summary["algorithm"] == "rest":  # ReST adopts only improving steps: its policy is the best one
        return max([summary["baseline"]["eval_accuracy"], *(r["eval_accuracy"] for r in rows)])
    return rows[-1]["eval_accuracy"] if rows else summary["baseline"]["eval_accuracy"]


def main(argv: list[str] | None = None) -> int:
    from flows.cli import QUIET_ENV, quiet_libraries

    for key, value in QUIET_ENV.items():  # as `flywheel run`: no telemetry writes racing the embedded server's database
        os.environ.setdefault(key, value)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dpo_recipe")
    parser.add_argument("--rest", default=str(Path(__file__).resolve().parents[1] / "recipes" / "arithmetic-rest.yaml"),
                        help="ReST recipe for the ReST row.")
    parser.add_argument("--losses", default=",".join(COMPARED), help="Comma-separated preference losses, one DPO row each.")
    parser.add_argument("--grpo", default=str(Path(__file__).resolve().parents[1] / "recipes" / "arithmetic-grpo.yaml"),
                        help="GRPO recipe for the GRPO row.")
    parser.add_argument("--out", default=".flywheel/compare", help="Folder for the lakes and the MLflow db.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Override for every run.")
    args = parser.parse_args(argv)
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    if unknown := [name for name in losses if name not in LOSSES]:  # before the first row's minutes, not after
        raise UserError(f"--losses: unknown loss {', '.join(map(repr, unknown))}; choose from {', '.join(LOSSES)}.")
    quiet_libraries()
    out = Path(args.out).resolve()
    common = [f"lake=file://{out}/lake", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", *args.overrides]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan = [("warm start", args.rest, ["grow_steps=0", "name=compare-warm"]), ("ReST", args.rest, ["name=compare-rest"])]
    plan += [(f"iterative DPO ({loss})", args.dpo_recipe, [f"preference.loss={loss}", f"name=compare-{loss}"])
             for loss in losses]
    grpo = load_recipe(args.grpo, common).grpo
    per_step = -(-load_recipe(args.rest, common).task.n_prompts // grpo.steps_per_iteration)  # M x D_b = the prompts
    plan.append(("GRPO", args.grpo, [f"grpo.prompts_per_step={per_step}", "name=compare-grpo"]))
    for _, path, extra in plan:  # every recipe and override is checked before the first run starts
        load_recipe(path, [*common, *extra])
    rows = []
    for label, path, extra in plan:
        summary, wall = _run(path, [*common, *extra], f"{extra[-1].split('=')[1]}-{stamp}")
        champion = summary.get("champion") or {}
        rows.append((label, _grown(summary), summary["baseline"]["eval_accuracy"], _final(summary), champion.get("eval_reward"),
                     wall))  # fmt: skip
        print(f"{label}: {rows[-1]}", flush=True)
    print("\n| run | grown samples | start accuracy | final accuracy | champion reward | wall time (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, grown, start, final, champ, wall in rows:
        print(f"| {label} | {grown} | {start:.3f} | {final:.3f} | {champ if champ is None else f'{champ:.3f}'} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    import sys

    try:
        raise SystemExit(main())
    except UserError as exc:  # one sentence, as from the flywheel CLI
        print(f"flywheel: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
