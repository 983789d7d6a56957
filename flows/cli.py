"""The ``flywheel`` command line: run a recipe, inspect the lake, serve deployments, run the local stack.

    flywheel run RECIPE.yaml [--set key=value ...] [--run-name NAME] [--verbose]
    flywheel inspect URI [--limit N] [--json]
    flywheel serve [RECIPE.yaml ...]
    flywheel stack up|down|status
    flywheel report RUN [--lake URI] [--out PATH]

``flywheel run`` prints one line per stage (the flow's and tasks' own log lines, with the time the
stage has taken), then the per-step table and where the logs, lake, MLflow run and champion are.
Prefect's per-task lines, MLflow's and Python's warnings go to ``.flywheel/logs/RUN.log`` instead
(``--verbose`` prints them as well).

Every command checks what it is given before it works: a mistake (an option's value, a lake, run,
table or file that is not there, a query the engine refuses) is one ``flywheel:`` sentence and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


# Set (unless the user set them) before any library reads them. Telemetry of Prefect and MLflow is
# off: runs stay on this machine, and the console shows no telemetry errors.
QUIET_ENV = {
    "DO_NOT_TRACK": "1",  # Prefect's client; MLflow reads only "true" here, hence the next line
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the embedded Prefect server
    # The embedded Prefect server migrates a new database on its first start: 20-25 s on 2 idle cores,
    # more on busy ones, where Prefect's own default gives up after 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # Spinning OpenMP threads slow torch down many times over on small, shared CPUs.
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # Progress bars of libraries: the console shows one line per stage instead.
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
LOG_DIR = Path(".flywheel/logs")
MODEL_COMMANDS = ("run", "serve")  # the only commands that load a model library


def quiet_libraries() -> None:
    """transformers' warnings and progress bars off. A process that has not imported it yet reads
    ``QUIET_ENV`` when it does, so nothing is imported here just to say so (a typo stays cheap)."""
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_run(args: argparse.Namespace) -> int:
    from alignment.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a mistake in the recipe is reported before anything heavy loads
    from flows.run import run_recipe, starts_local_ray
    from tasks.lake import check_name
    from tasks.lake import default_run_name
    from tasks.tracking.probe import check_tracking

    name = check_name(args.run_name or default_run_name(recipe), "run name")
    check_tracking(recipe.mlflow.tracking_uri)  # a stopped server: one sentence before Prefect starts
    log_path = LOG_DIR / f"{name}.log"
    from flows.console import RunConsole, where_lines

    console = RunConsole(log_path, args.verbose).open()
    if args.process_exits and starts_local_ray(recipe):
        from alignment import lifeline

        lifeline.start_reaper()  # the local cluster's agents would outlive a run killed outright (SIGKILL)
    try:
        summary = run_recipe(recipe, name)
    except Exception as exc:
        from flows.errors import RunStopped, service_failure, user_errors

        if isinstance(exc, RunStopped) and not args.verbose:
            exc.log = log_path  # its traceback went there
        elif not args.verbose and not isinstance(exc, user_errors()) and not service_failure(exc):
            print(f"flywheel: run {name} failed; Prefect's log of it: {log_path}", file=sys.stderr)
        raise
    finally:
        if not args.process_exits:
            console.close()
    from tasks.report.summary import console_table

    print(console_table(summary))
    print("\n".join(where_lines(summary, None if args.verbose else log_path)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.sql import QueryError, check_out, open_lake
    from tasks.lake import RUN_FILE, check_name

    check_name(args.run, "run name")
    out = check_out(args.out or f"{args.run}-report.html")
    lake = open_lake(args.lake)
    run_uri = lake.run_uri(args.run)
    if not lake.store.exists(f"{run_uri}/summary.json"):
        known = lake.store.exists(f"{run_uri}/{RUN_FILE}")
        raise QueryError(
            f"Run {args.run!r} in {lake.uri} has no summary yet (it stopped before its baseline was registered); resume it first."
            if known else f"No run {args.run!r} in {lake.uri}; `flywheel runs --lake {lake.uri}` lists its runs."
        )
    try:
        lake.get_json(f"{run_uri}/summary.json")
    except ValueError as exc:
        raise QueryError(f"{run_uri}/summary.json is not valid JSON ({exc}); resume the run to write it again.") from None
    from tasks.report.html import write_report

    print(write_report(lake.uri, args.run, out))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from flows.inspect import inspect_uri, render

    report = inspect_uri(args.uri, limit=args.limit)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from flows.sql import QueryError, check_out, open_lake, query, render, write

    out = check_out(args.out) if args.out else None
    terminal = out is None and sys.stdout.isatty()
    if args.format == "parquet" and terminal:
        raise QueryError("--format parquet is binary and stdout is a terminal; give --out FILE.parquet or redirect the output to a file.")
    write(render(query(open_lake(args.lake), args.query), args.format, shutil.get_terminal_size().columns if terminal else None), out)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from flows.sql import open_lake, runs

    rows = runs(open_lake(args.lake))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    wide = max([len(r["run"]) for r in rows] + [30])  # a long run name does not push the columns out of line
    print(f"{'run':{wide}} {'status':10} {'algorithm':13} {'iter':>4} {'best':>6}  {'champion (at its end)':28} {'reward':>7}  started")
    for r in rows:
        print(f"{r['run']:{wide}} {r['status']:10} {r['algorithm'] or '-':13} {r['iterations']:>4} {figure(r['best_reward']):>6}  "
              f"{r['champion'] or '-':28} {figure(r['champion_reward']):>7}  {r['started'] or '-'}")
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
    except stack.StackError as exc:  # a service that would not start or stop; StackInputError: the command's input
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, stack.StackInputError) else 1
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


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake in the arguments said like every other: one ``flywheel:`` sentence, exit 2."""

    def error(self, message: str):
        self.exit(2, f"flywheel: {message}; `{self.prog} --help` lists the arguments.\n")


def _version() -> str:
    """The installed package's version (a checkout that is not installed says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flywheel")
    except PackageNotFoundError:
        return "(not installed: run `make test` or `pip install -e .`)"


def whole(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}, got {text!r}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


PORT = whole(1, 65535)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="flywheel", description="Self-improvement loops for language models.")
    parser.add_argument("--version", action="version", version=f"flywheel {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def lake_option(p: argparse.ArgumentParser, says: str = "The lake: file://PATH or s3://BUCKET/PREFIX.") -> None:
        p.add_argument("--lake", default="file://./lake", help=says)  # sql, runs and report read the recipes' default lake

    p = sub.add_parser("run", help="Run one flywheel run from a recipe.")
    p.add_argument("recipe", help="Recipe YAML file, e.g. recipes/arithmetic-rest.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a recipe key, e.g. --set grow.samples_per_prompt=4 (repeatable).")
    p.add_argument("--run-name", default=None, help="Name of the run; re-using a name resumes that run.")
    p.add_argument("--verbose", action="store_true",
                   help="Also print Prefect's per-task log lines and library warnings (else in .flywheel/logs/RUN.log).")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("inspect", help="Show counts, reward statistics and sample rows of any lake URI.")
    p.add_argument("uri", help="A lake, run, table or partition URI, e.g. file://./lake/runs/RUN, "
                               "file://./lake/scored/run=RUN/iteration=1 or s3://bucket/prefix/runs/RUN")
    p.add_argument("--limit", type=whole(0), default=5, help="Sample rows to show per stage.")
    p.add_argument("--json", action="store_true", help="Print JSON for scripts.")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("sql", help="SQL over the lake's stage tables (scored, filtered, eval, ... and drops).")
    p.add_argument("query", help='e.g. "SELECT run, iteration, avg(reward) FROM scored GROUP BY run, iteration"')
    lake_option(p)
    p.add_argument("--format", choices=["table", "json", "csv", "parquet"], default="table", help="Output format.")
    p.add_argument("--out", default=None, help="Write the result to this file instead of stdout.")
    p.set_defaults(func=cmd_sql)
    p = sub.add_parser("runs", help="List the runs in a lake: status, iterations, best held-out reward, champion, start time.")
    lake_option(p)
    p.add_argument("--json", action="store_true", help="Print JSON for scripts.")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("serve", help="Serve recipes as Prefect deployments (schedules, runs from the UI or API).")
    p.add_argument("recipes", nargs="*", help="Recipe YAML files (default: every recipes/*.yaml).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a key in every recipe, e.g. --set mlflow.tracking_uri=http://127.0.0.1:5000")
    p.add_argument("--limit", type=whole(1), default=None, help="Most flow runs this process executes at once.")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("stack", help="Start, stop or check the local Prefect, MLflow and S3 servers (127.0.0.1).")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--prefect-port", type=PORT, default=4200, help="Prefect server and UI port.")
    p.add_argument("--mlflow-port", type=PORT, default=5000, help="MLflow server port.")
    p.add_argument("--s3-port", type=PORT, default=8333, help="SeaweedFS S3 port.")
    p.add_argument("--no-ui", action="store_true", help="Start the Prefect server without its UI.")
    p.add_argument("--timeout", type=seconds, default=180.0, help="Seconds to wait for each service to answer.")
    p.add_argument("--json", action="store_true", help="Print JSON for scripts.")
    p.set_defaults(func=cmd_stack)
    p = sub.add_parser("report", help="Write one self-contained HTML report of a run (plots inline).")
    p.add_argument("run", help="The run's name.")
    lake_option(p, "The run's lake (file://PATH or s3://BUCKET/PREFIX).")
    p.add_argument("--out", default=None, help="Where to write the HTML (default RUN-report.html).")
    p.set_defaults(func=cmd_report)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = parser.parse_args(argv)
    args.process_exits = argv is None  # the command line, not a caller such as a test: nothing to put back
    if args.command in MODEL_COMMANDS:  # the others load no model library: keep them quick
        quiet_libraries()
    try:
        return args.func(args)
    except Exception as exc:
        from flows.errors import service_failure, user_errors  # only what the command has loaded: no torch to report

        if why := service_failure(exc):
            print(f"flywheel: {why}", file=sys.stderr)
            return 1
        if not isinstance(exc, user_errors()):
            raise
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
