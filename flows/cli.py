"""The ``flywheel`` command line: run a recipe, inspect the lake, serve deployments, run the local stack.

    flywheel run RECIPE.yaml [--set key=value ...] [--run-name NAME]
    flywheel inspect URI [--limit N] [--json]
    flywheel serve [RECIPE.yaml ...]
    flywheel stack up|down|status
"""

from __future__ import annotations

import argparse
import json
import os
import sys


# Set (unless the user set them) before any library reads them. Telemetry of Prefect and MLflow is
# off: runs stay on this machine, and the console shows no telemetry errors.
QUIET_ENV = {
    "DO_NOT_TRACK": "1",  # Prefect's client; MLflow reads only "true" here, hence the next line
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the embedded Prefect server
    # Spinning OpenMP threads slow torch down many times over on small, shared CPUs.
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
MODEL_COMMANDS = ("run", "serve")  # the only commands that load a model library


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def format_table(summary: dict) -> str:
    """The per-step table: iteration, step, tau, samples, kept, held-out reward."""
    head = f"{'iter':>4} {'step':>4} {'tau':>7} {'samples':>8} {'kept':>7} {'eval_reward':>12} {'exact':>7} {'version':>8}"
    lines = [head, "-" * len(head)]
    b = summary.get("baseline") or {}
    if b:
        lines.append(f"{0:>4} {0:>4} {'-':>7} {'-':>8} {'-':>7} {b['eval_reward']:>12.3f} {b['eval_accuracy']:>7.3f} {b['model_version']:>8}")
    for r in summary.get("iterations", []):
        tau = "-" if r.get("tau") is None else f"{r['tau']:.3f}"
        reward = "skipped" if r.get("eval_reward") is None else f"{r['eval_reward']:.3f}"
        exact = "-" if r.get("eval_accuracy") is None else f"{r['eval_accuracy']:.3f}"
        version = (r.get("model_version") or "-") + ("*" if r.get("promoted") else "")
        lines.append(f"{r['iteration']:>4} {r['step']:>4} {tau:>7} {r['samples']:>8} {r['kept']:>7} {reward:>12} {exact:>7} {version:>8}")
    champ = summary.get("champion")
    if champ:
        lines.append(f"champion: models:/{champ['model_name']}@champion = version {champ['version']} (held-out reward {champ['eval_reward']:.3f}); * = promoted")
    if summary.get("stopped"):
        lines.append(f"stopped: {summary['stopped']}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from alignment.recipe import load_recipe
    from flows.run import run_recipe
    from tasks.register import check_tracking

    recipe = load_recipe(args.recipe, args.overrides)
    check_tracking(recipe.mlflow.tracking_uri)  # a stopped server: one sentence before Prefect starts
    summary = run_recipe(recipe, args.run_name)
    print(format_table(summary))
    print(f"summary: {summary['lake']}/{summary['run']}/summary.json")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from flows.inspect import inspect_uri, render

    report = inspect_uri(args.uri, limit=args.limit)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    serve(args.recipes, args.overrides, limit=args.limit)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from infra import stack

    try:
        if args.action == "up":
            ports = {"prefect": args.prefect_port, "mlflow": args.mlflow_port, "s3": args.s3_port}
            report = stack.up(".", ports, ui=not args.no_ui, timeout=args.timeout)
        elif args.action == "down":
            done = stack.down(".")
            print(f"stopped: {', '.join(done['stopped']) or 'nothing was running'}")
            if done["still_listening"]:
                print(f"still listening on 127.0.0.1: {done['still_listening']}")
            return 1 if done["still_listening"] else 0
        else:
            report = stack.status(".")
    except stack.StackError as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, s in report.items():
            state = "healthy" if s["healthy"] else ("running, not answering" if s["running"] else "stopped")
            print(f"{name:8} {state:24} {s['url'] or '-':30} pid {s['pid'] or '-':<8} log {s['log']}")
        if args.action == "up":
            print(f"\nclients: source {stack.STACK_DIR}/env   (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_* for the S3 server)")
            print("recipes: --set lake=s3://lake/flywheel --set mlflow.tracking_uri=" + report["mlflow"]["url"])
    return 0 if all(s["healthy"] for s in report.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description="Self-improvement loops for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="Run one flywheel run from a recipe.")
    p.add_argument("recipe", help="Recipe YAML file, e.g. recipes/arithmetic-rest.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a recipe key, e.g. --set grow.samples_per_prompt=4 (repeatable).")
    p.add_argument("--run-name", default=None, help="Name of the run; re-using a name resumes that run.")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("inspect", help="Show counts, reward statistics and sample rows of any lake URI.")
    p.add_argument("uri", help="A run, iteration or stage URI, e.g. file://./lake/RUN or s3://bucket/prefix/RUN")
    p.add_argument("--limit", type=int, default=5, help="Sample rows to show per stage.")
    p.add_argument("--json", action="store_true", help="Print JSON for scripts.")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("serve", help="Serve recipes as Prefect deployments (schedules, runs from the UI or API).")
    p.add_argument("recipes", nargs="*", help="Recipe YAML files (default: every recipes/*.yaml).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a key in every recipe, e.g. --set mlflow.tracking_uri=http://127.0.0.1:5000")
    p.add_argument("--limit", type=int, default=None, help="Most flow runs this process executes at once.")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("stack", help="Start, stop or check the local Prefect, MLflow and S3 servers (127.0.0.1).")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--prefect-port", type=int, default=4200, help="Prefect server and UI port.")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port.")
    p.add_argument("--s3-port", type=int, default=8333, help="SeaweedFS S3 port.")
    p.add_argument("--no-ui", action="store_true", help="Start the Prefect server without its UI.")
    p.add_argument("--timeout", type=float, default=180.0, help="Seconds to wait for each service to answer.")
    p.add_argument("--json", action="store_true", help="Print JSON for scripts.")
    p.set_defaults(func=cmd_stack)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = parser.parse_args(argv)
    if args.command in MODEL_COMMANDS:  # the others load no model library: keep them quick
        _quiet_libraries()
    try:
        return args.func(args)
    except Exception as exc:
        from flows.errors import user_errors  # only what the command has loaded: no torch to report

        if not isinstance(exc, user_errors()):
            raise
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
