"""Run the benchmarks in ``bench/`` and print one table of ratios against their peers.

    .venv/bin/python bench/run.py                 # every bench/bench_*.py, one after another
    .venv/bin/python bench/run.py --only sampler  # one bench (``sampler``, ``bench_sampler`` or the file name)
    .venv/bin/python bench/run.py --only sampler --only sft --only dpo_step   # several, in that order
    make bench                                    # the same as the first line

The convention every ``bench/bench_*.py`` follows:

- It is a plain script, run from the repository root as ``python bench/bench_NAME.py`` with no
  arguments (its own options must all have defaults suited to 2 CPU cores; a GPU is used if present).
- It measures ours and a peer **in the same process and the same run**, so machine noise and other
  load hit both alike. Speed is only ever reported as a ratio against that peer, never as a time
  asserted against a constant (no timed assertions in tests either).
- It prints a human-readable table, and **its last stdout line is one JSON object**::

      {"bench": "sampler", "ratio": 3.1, "ratio_means": "ours/peer samples per second",
       "target": ">1", ...any other figures...}

  ``bench`` names it, ``ratio`` is the headline number, ``ratio_means`` says which way round it is,
  and ``target`` (optional) is a comparison such as ``">1"`` or ``"<=0.2"`` that the ratio should
  meet. Other keys are kept in the results file as they are.
- A correctness check that fails (e.g. the two sides disagree) exits non-zero.

The runner runs each bench in a subprocess (stdout echoed as it comes, stderr kept), takes the
last stdout line that parses as a JSON object, prints the table, and writes each result (exit code,
wall time, when, the load average after it, and the tail of stderr of a failed bench) to
``bench/results/latest.json``, which is gitignored; a bench not run this time (``--only``) keeps
its previous record there, unless its file is gone. It exits non-zero when a bench failed or printed
no result line; a missed target is reported but is not a failure, because the machine may be loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
_TARGET = re.compile(r"^\s*(<=|>=|<|>)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


def discover(only: list[str] | str | None = None) -> list[Path]:
    """``bench/bench_*.py`` in name order; ``only`` picks some, in its order, by short name, module name or file name."""
    found = sorted(BENCH_DIR.glob("bench_*.py"))
    if not only:
        return found
    picked: list[Path] = []
    for name in [only] if isinstance(only, str) else only:
        want = Path(name).name.removesuffix(".py").removeprefix("bench_")
        match = [p for p in found if p.stem.removeprefix("bench_") == want]
        if not match:
            names = ", ".join(p.stem.removeprefix("bench_") for p in found) or "none"
            raise SystemExit(f"No bench named {name!r} in {BENCH_DIR} (there are: {names}).")
        picked += [p for p in match if p not in picked]
    return picked


def result_line(stdout: str) -> dict | None:
    """The last stdout line that is a JSON object, or ``None``."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def meets(ratio: object, target: object) -> bool | None:
    """Whether ``ratio`` meets a target like ``">1"``; ``None`` when either is missing or unreadable."""
    if not isinstance(ratio, (int, float)) or not isinstance(target, str):
        return None
    m = _TARGET.match(target)
    if m is None:
        return None
    op, value = m.group(1), float(m.group(2))
    return {"<": ratio < value, "<=": ratio <= value, ">": ratio > value, ">=": ratio >= value}[op]


def run_one(path: Path, timeout: float) -> dict:
    """Run one bench, echoing its stdout as it comes, and return its record."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    print(f"\n=== {path.relative_to(ROOT)} ===", flush=True)
    start = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, str(path.relative_to(ROOT))], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as proc:
        # stderr is drained by a thread so a chatty bench cannot block on a full pipe; a timer kills
        # a bench that runs past the timeout (its stdout then ends and the loop below finishes).
        err_chunks: list[str] = []
        reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
        killer = threading.Timer(timeout, proc.kill)
        reader.start()
        killer.start()
        for line in proc.stdout:
            lines.append(line)
            print(line, end="", flush=True)
        proc.wait()
        killer.cancel()
        reader.join(timeout=5)
    seconds = time.perf_counter() - start
    stderr = "".join(err_chunks)
    record: dict = {
        "file": str(path.relative_to(ROOT)), "rc": proc.returncode, "seconds": round(seconds, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_after": _load(),
    }
    if seconds >= timeout:
        record["timed_out"] = True
    result = result_line("".join(lines))
    if result is not None:
        record["result"] = result
        record["meets_target"] = meets(result.get("ratio"), result.get("target"))
    if proc.returncode != 0 or result is None:
        record["stderr_tail"] = stderr[-4000:]
        why = f"exit code {proc.returncode}" if proc.returncode != 0 else "no JSON result line on stdout"
        print(f"--- {path.name}: {why}; last lines of stderr:\n{stderr[-2000:]}", flush=True)
    return record


def table(records: list[dict]) -> str:
    head = f"{'bench':<20} {'ratio':>9}  {'target':>7} {'met':>4} {'wall s':>7} {'params':>7}  ratio means"
    rows = [head, "-" * len(head)]
    for r in records:
        res = r.get("result") or {}
        name = res.get("bench") or Path(r["file"]).stem.removeprefix("bench_")
        ratio = res.get("ratio")
        ratio_s = f"{ratio:.3f}" if isinstance(ratio, (int, float)) else "-"
        met = {True: "yes", False: "NO", None: "-"}[r.get("meets_target")]
        if r.get("timed_out"):
            means = "TIMED OUT"
        elif r["rc"] != 0:
            means = f"FAILED (exit code {r['rc']})"
        elif not res:
            means = "no JSON result line"
        else:
            means = str(res.get("ratio_means", ""))
        params = res.get("model_params")
        params_s = f"{params / 1e6:.1f}M" if isinstance(params, (int, float)) else "-"
        rows.append(f"{name:<20} {ratio_s:>9}  {str(res.get('target', '-')):>7} {met:>4} {r['seconds']:>7.1f} {params_s:>7}  {means}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", metavar="NAME", action="append",
        help="run this bench (e.g. sampler or bench_sampler.py); repeat to run several",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a bench is killed (default 900)")
    args = parser.parse_args(argv)

    records = [run_one(path, args.timeout) for path in discover(args.only)]
    print("\n" + table(records))
    out = save(records)
    print(f"\nresults: {out.relative_to(ROOT)}")
    return 0 if records and all(r["rc"] == 0 and "result" in r for r in records) else 1


def save(records: list[dict]) -> Path:
    """Write ``latest.json``: these records, plus the last record of every bench not run this time."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "latest.json"
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    try:
        kept = [r for r in json.loads(out.read_text()).get("benches", []) if isinstance(r, dict)]
    except (OSError, ValueError):
        kept = []
    ran = {r["file"] for r in records}
    kept = [r for r in kept if r.get("file") not in ran and (ROOT / str(r.get("file"))).is_file()]  # a removed bench goes
    merged = sorted(kept + records, key=lambda r: r.get("file", ""))
    out.write_text(json.dumps({"updated": when, "machine": machine, "benches": merged}, indent=2) + "\n")
    return out


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
