"""The orchestration bench's tables and its JSON result line (bench_orchestration.py measures; this prints).

Imported by bench_orchestration.py as a sibling module, like bench/realistic.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from alignment.recipe import Recipe


def print_per_task(per: dict, n: int, repeats: int, width: int) -> None:
    ms = lambda xs: "".join(f"{x * 1000:>8.2f}ms" for x in xs)  # noqa: E731
    print(f"\n1. task-run overhead inside a flow run ({n} no-op tasks taking a RunRef, least of {repeats} flow runs)")
    print(f"{'':56}{'wall s':>10}{'CPU s':>10}{'server CPU s':>14}")
    for name, label in (("plain", "plain calls"), ("called", "task runs, called"),
                        ("plain_threads", f"plain calls, {width} at a time on a thread pool"),
                        ("mapped", f"task runs, mapped {width} at a time on the thread runner")):
        print(f"{label:56}" + "".join(f"{x:>10.3f}" for x in per[name]))
    print(f"{'overhead per task run, called (wall, CPU, server CPU)':56}{ms(per['called_per_task'])}")
    print(f"{'overhead per task run, mapped':56}{ms(per['mapped_per_task'])}")


def report(args: argparse.Namespace, recipe: Recipe, per: dict, it: dict, once: dict[str, float], *,
           task_runs: tuple[int, int], target: float, width: int) -> dict:
    """Print the tables; return the result line's object. ``task_runs``: the iteration's (called, mapped) task runs."""
    n_called, n_mapped = task_runs
    body, cpu, per_run = it["body"], it["cpu"], it["per_run"]
    rounds = list(zip(body["plain"], body["flow"]))  # each round's two arms, seconds apart
    share = statistics.median((f - p) / p for p, f in rounds)
    overhead_s = statistics.median(f - p for p, f in rounds)  # per iteration
    plain_s, run_s = statistics.median(body["plain"]), statistics.median(per_run)
    fastest = (min(body["flow"]) - min(body["plain"])) / min(body["plain"])
    estimated_s = n_called * per["called_per_task"][0] + n_mapped * per["mapped_per_task"][0]
    breakeven = max(overhead_s, estimated_s) / target  # the shortest iteration in which Prefect stays under the target
    same = it["rows"]["plain"] == it["rows"]["flow"]
    fmt = lambda ts: " ".join(f"{t:.2f}" for t in ts)  # noqa: E731

    print(f"\nOMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average now: {os.getloadavg()[0]:.1f}")
    print_per_task(per, args.tasks, args.repeats, width)

    print(f"\n2. one ReST iteration of {Path(args.recipe).name}, grow.shards={recipe.grow.shards} "
          f"({recipe.task.n_prompts} prompts x N={recipe.grow.samples_per_prompt}), {args.rounds} rounds; "
          f"warm start (untimed) {once['warm_start_s']:.0f} s")
    print(f"{'':56}{'fastest':>10}{'median':>10}   runs")
    for arm, label in (("plain", "plain functions (task.fn), shards on threads"),
                       ("flow", f"in the flow body ({n_called} called + {n_mapped} mapped task runs)")):
        print(f"{label:56}{min(body[arm]):>10.2f}{statistics.median(body[arm]):>10.2f}   {fmt(body[arm])}")
    print(f"{'  its steps, in the fastest run of each arm':56}{'plain':>10}{'flow':>10}")
    for name in it["steps"]["plain"]:
        print(f"{'    ' + name:56}{it['steps']['plain'][name]:>10.2f}{it['steps']['flow'].get(name, 0.0):>10.2f}")
    print(f"{'  CPU s (least of the runs), plain arm: process, server':56}{cpu['plain'][0]:>10.2f}{cpu['plain'][1]:>10.2f}")
    print(f"{'  CPU s (least of the runs), flow arm: process, server':56}{cpu['flow'][0]:>10.2f}{cpu['flow'][1]:>10.2f}")
    print(f"{'Prefect per iteration: median of the rounds flow - plain':56}{overhead_s:>10.2f}")
    print(f"{'measured share: median of the rounds (flow - plain) / plain':56}{share:>10.2%}   target < {target:.0%}")
    print(f"{'  from the fastest run of each arm':56}{fastest:>10.2%}")
    print(f"{'estimated share (task runs x per-task overhead)':56}{estimated_s / plain_s:>10.2%}")
    print(f"{'shortest iteration under the target':56}{breakeven:>10.1f}   (this demo's: {plain_s:.1f})")

    print("\nonce per flow run or process, in no share above")
    print(f"{'flow run start + teardown (wall - body), median':56}{run_s:>10.2f}   {fmt(per_run)}")
    print(f"{'a one-iteration run: (per run + per iteration) / plain':56}{(run_s + overhead_s) / plain_s:>10.2%}")
    label = "embedded server startup (fresh home)" if once["server_startup_s"] else "server startup (PREFECT_API_URL set)"
    print(f"{label:56}{once['server_startup_s']:>10.2f}")
    print(f"{'first flow run of the process (empty)':56}{once['first_flow_run_s']:>10.2f}")
    print("both arms kept the same rows and reached the same held-out reward" if same else
          f"WARNING: the arms differ: {it['rows']['plain']} vs {it['rows']['flow']}")
    r3 = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
    return {
        "bench": "orchestration", "ratio": round(share, 4),
        "ratio_means": "Prefect's share of one sharded iteration: (in-flow iteration - plain) / plain, median of rounds",
        "target": f"<{target}", "estimated_share": round(estimated_s / plain_s, 4), "fastest_share": round(fastest, 4),
        "overhead_s_per_iteration": round(overhead_s, 3), "breakeven_iteration_s": round(breakeven, 1),
        "task_runs": n_called + n_mapped, "mapped_task_runs": n_mapped,
        "per_task_ms_called": round(per["called_per_task"][0] * 1000, 2),
        "per_task_ms_mapped": round(per["mapped_per_task"][0] * 1000, 2),
        "per_task_cpu_ms": {k: [round(x * 1000, 2) for x in per[f"{k}_per_task"][1:]] for k in ("called", "mapped")},
        "per_run_s": round(run_s, 2), "per_run_min_s": round(min(per_run), 2),
        "one_iteration_run_share": round((run_s + overhead_s) / plain_s, 4),
        "iteration_plain_runs_s": r3(body["plain"]), "iteration_flow_runs_s": r3(body["flow"]),
        "iteration_cpu_s": {arm: {"process": round(c[0], 2), "server": round(c[1], 2)} for arm, c in cpu.items()},
        **{k: round(v, 2) for k, v in once.items()},
        "shards": recipe.grow.shards, "same_results": same, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
