"""Bad input, as people meet it: ``flywheel run`` in a subprocess, one case per mistake.

For each of the cases below — recipe keys, types and values; prompt files; rewards; model folders;
lake and tracking URIs; run names; sampler options — the command must exit with code 2 and print
exactly one ``flywheel:`` line (naming what was wrong), no ``Traceback``, and leave no stage
manifest in the lake and no model version in MLflow: every one of these is caught before anything
is committed.

The cases run two at a time in subprocesses (``OMP_NUM_THREADS=1``), each in its own directory with
its own lake, MLflow database and Prefect home; most fail within seconds, before Prefect starts.

Run: ``.venv/bin/python -m pytest tests/test_bad_inputs_cli.py -q``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.flywheel_helpers import FAST, RECIPE, ROOT

QUICK = [*FAST, "warm_start.enabled=false", "grow_steps=1"]
CASE_TIMEOUT_S = 150


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


CLOSED = _closed_port()

REWARDS = '''
import math, time

def raises(prompts, completions, references):
    raise KeyError("answer")

def wrong_length(prompts, completions, references):
    return [1.0] * (len(completions) - 1)

def nan(prompts, completions, references):
    return [math.nan] * len(completions)

def strings(prompts, completions, references):
    return ["1.0"] * len(completions)

def bools(prompts, completions, references):
    return [True] * len(completions)

def none(prompts, completions, references):
    return None

def never_returns(prompts, completions, references):
    time.sleep(3600)

not_a_function = 3
'''

GOOD_ROWS = [{"prompt": f"{a}+{b}=", "reference": str(a + b)} for a in range(5) for b in range(4)]


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# Prompt files, by name (the good eval file is always there).
PROMPT_FILES = {
    "good": _jsonl(GOOD_ROWS),
    "empty": "",
    "blank": "\n\n",
    "wrong-columns": _jsonl([{"question": "1+1=", "answer": "2"}]),
    "null-prompt": _jsonl([*GOOD_ROWS[:3], {"prompt": None, "reference": "3"}, *GOOD_ROWS[3:]]),
    "null-reference": _jsonl([*GOOD_ROWS[:5], {"prompt": "1+2=", "reference": None}]),
    "list-prompt": _jsonl([*GOOD_ROWS[:2], {"prompt": ["1+2="], "reference": "3"}]),
    "empty-prompt": _jsonl([*GOOD_ROWS[:2], {"prompt": "", "reference": "3"}]),
    "bad-json": _jsonl(GOOD_ROWS[:2]) + '{"prompt": "1+2=", "reference": \n',
    "too-long": _jsonl([*GOOD_ROWS[:2], {"prompt": "1+" * 200 + "1=", "reference": "201"}]),
    "duplicate-ids": _jsonl([{"id": i % 3, **r} for i, r in enumerate(GOOD_ROWS)]),
    "prompts.csv": "prompt,reference\n1+1=,2\n",
}


@dataclass
class Case:
    id: str
    sets: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)  # substrings of the flywheel: line
    run_name: str = "bad"
    recipe: str | None = None  # a recipe file written for the case (its text), else the demo recipe
    recipe_path: str | None = None  # a path given as is
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset


def _files(prompts: str, eval_: str = "good") -> list[str]:
    return ["task.builtin=null", f"task.prompts={{base}}/data/{prompts}.jsonl", f"task.eval={{base}}/data/{eval_}.jsonl"]


def _reward(name: str) -> str:
    return f"reward=bad_rewards:{name}"


CASES = [
    # -- recipe: keys, types, values -------------------------------------------------------------
    Case("unknown-key", ["grow.samples=4"], ["unknown key 'grow.samples'"]),
    Case("count-true", ["grow.samples_per_prompt=true"], ["grow.samples_per_prompt"]),
    Case("count-fraction", ["grow.samples_per_prompt=2.5"], ["grow.samples_per_prompt"]),
    Case("number-true", ["improve.lr=true"], ["improve.lr"]),
    Case("number-word", ["improve.lr=abc"], ["improve.lr"]),
    Case("number-nan", ["grow.temperature=.nan"], ["grow.temperature"]),
    Case("number-not-yaml", ["grow.temperature=*"], ["grow.temperature", "expected a number", "'*'"]),  # `*`: a YAML alias
    Case("switch-number", ["filter.dedupe=1"], ["filter.dedupe"]),
    Case("string-list", ["task.prompt_column=[a, b]"], ["task.prompt_column"]),
    Case("not-allowed", ["filter.kind=best"], ["filter.kind", "'rest'"]),
    Case("needs-other-key", ["filter.kind=fixed"], ["filter.threshold"]),
    Case("override-form", ["grow.samples_per_prompt"], ["dotted.key=value"]),
    Case("reward-timeout-zero", ["reward_timeout_s=0"], ["reward_timeout_s"]),
    Case("recipe-missing", recipe_path="nope.yaml", expect=["nope.yaml", "does not exist"]),
    Case("recipe-not-yaml", recipe="name: [unclosed\n", expect=["not valid YAML"]),
    Case("recipe-string-count", recipe="name: typed\nimprove:\n  steps: '2'\n", expect=["improve.steps", "(got '2')"]),
    # -- prompt files ------------------------------------------------------------------------------
    Case("prompts-missing", [*_files("nope")], ["nope.jsonl", "does not exist"]),
    Case("prompts-empty", [*_files("empty")], ["empty.jsonl", "no rows"]),
    Case("prompts-wrong-columns", [*_files("wrong-columns")], ["no column 'prompt'"]),
    Case("prompts-null", [*_files("null-prompt")], ["null-prompt.jsonl", "'prompt'", "row 4"]),
    Case("references-null", [*_files("null-reference")], ["null-reference.jsonl", "'reference'", "row 6"]),
    Case("prompts-list", [*_files("list-prompt")], ["list-prompt.jsonl", "'prompt'"]),
    Case("prompts-empty-string", [*_files("empty-prompt")], ["empty-prompt.jsonl", "'prompt'", "row 3"]),
    Case("prompts-bad-json", [*_files("bad-json")], ["bad-json.jsonl"]),
    Case("prompts-too-long", [*_files("too-long")], ["training prompts"]),
    Case("prompts-duplicate-ids", [*_files("duplicate-ids")], ["duplicate-ids.jsonl", "'id'"]),
    Case("eval-wrong-columns", [*_files("good", "wrong-columns")], ["wrong-columns.jsonl", "no column 'prompt'"]),
    # -- rewards -----------------------------------------------------------------------------------
    Case("reward-unknown", ["reward=exact-match"], ["Unknown reward 'exact-match'"]),
    Case("reward-unimportable", ["reward=no_such_module:score"], ["'no_such_module'"]),
    Case("reward-not-callable", [_reward("not_a_function")], ["not_a_function"]),
    Case("reward-raises", [_reward("raises")], ["raises", "KeyError"]),
    Case("reward-wrong-length", [_reward("wrong_length")], ["wrong_length", "values for"]),
    Case("reward-nan", [_reward("nan")], ["nan", "non-finite"]),
    Case("reward-strings", [_reward("strings")], ["strings", "'1.0'"]),
    Case("reward-bools", [_reward("bools")], ["bools", "True"]),
    Case("reward-none", [_reward("none")], ["none"]),
    Case("reward-never-returns", [_reward("never_returns"), "reward_timeout_s=2"], ["never_returns", "reward_timeout_s"]),
    Case("reward-model-missing", ["reward=rm:/nonexistent/rm"], ["rm:/nonexistent/rm"]),
    # -- model folders -----------------------------------------------------------------------------
    Case("model-no-config", ["model.path={base}/models/empty"], ["config.json"]),
    Case("model-no-weights", ["model.path={base}/models/no-weights"], ["no weights"]),
    Case("model-chat-without-template", ["model.path={base}/models/no-template", "prompt.format=chat"], ["chat template"]),
    # -- lake and tracking URIs --------------------------------------------------------------------
    Case("lake-gs", ["lake=gs://bucket/lake"], ["gs://bucket/lake"]),
    Case("lake-ftp", ["lake=ftp://host/lake"], ["ftp://host/lake"]),
    Case("lake-unwritable", ["lake=file:///proc/flywheel-lake"], ["/proc/flywheel-lake"]),
    Case("lake-s3-no-credentials", ["lake=s3://lake/x", f"s3.endpoint_url=http://127.0.0.1:{CLOSED}"], ["credentials"],
         env={"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent", "AWS_ACCESS_KEY_ID": None,
              "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "AWS_DEFAULT_PROFILE": None}),
    Case("lake-s3-down", ["lake=s3://lake/x", f"s3.endpoint_url=http://127.0.0.1:{CLOSED}"], [f"http://127.0.0.1:{CLOSED}"],
         env={"AWS_ACCESS_KEY_ID": "flywheel", "AWS_SECRET_ACCESS_KEY": "flywheel"}),
    Case("tracking-down", [f"mlflow.tracking_uri=http://127.0.0.1:{CLOSED}"], [f"127.0.0.1:{CLOSED}"]),
    # -- environment -------------------------------------------------------------------------------
    Case("progress-seconds-word", expect=["FLYWHEEL_PROGRESS_SECONDS='often'", "positive number of seconds"],
         env={"FLYWHEEL_PROGRESS_SECONDS": "often"}),
    Case("progress-seconds-zero", expect=["FLYWHEEL_PROGRESS_SECONDS='0'"], env={"FLYWHEEL_PROGRESS_SECONDS": "0"}),
    Case("model-name", ["mlflow.model_name=../escape"], ["mlflow.model_name"]),
    # -- run names ---------------------------------------------------------------------------------
    Case("run-dotdot", run_name="..", expect=["'..'"]),
    Case("run-slash", run_name="a/b", expect=["'/'"]),
    Case("run-partition", run_name="x/iteration=9", expect=["run name"]),
    Case("run-equals", run_name="iteration=3", expect=["'='"]),
    Case("run-300-chars", run_name="r" * 300, expect=["300 characters"]),
    # -- sampler options ---------------------------------------------------------------------------
    Case("sampler-unknown-option", ["grow.sampler_options.bogus=1"], ["bogus"]),
    Case("sampler-api-key", ["grow.sampler_options.api_key=sk-not-a-real-key"], ["api_key"]),
    Case("sampler-missing-option", ["grow.sampler=openai"], ["needs 'base_url'"]),
    Case("sampler-n-per-request", ["grow.sampler=openai", f"grow.sampler_options.base_url=http://127.0.0.1:{CLOSED}/v1",
                                   "grow.sampler_options.n_per_request=0"], ["grow.sampler_options.n_per_request", ">= 1"]),
]


# -- running the cases -----------------------------------------------------------------------------
@dataclass
class Result:
    rc: int
    out: str
    seconds: float
    manifests: list[str]
    versions: int


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Shared inputs: prompt files, a module of broken rewards, and broken model folders."""
    base = tmp_path_factory.mktemp("bad-inputs")
    (base / "data").mkdir()
    for name, text in PROMPT_FILES.items():
        (base / "data" / (name if "." in name else f"{name}.jsonl")).write_text(text)
    (base / "bad_rewards.py").write_text(REWARDS)
    models = base / "models"
    (models / "empty").mkdir(parents=True)
    from alignment.arithmetic import arithmetic_task
    from alignment.models import build_tiny_model

    task = arithmetic_task(n_labelled=20, n_prompts=20, n_eval=20)
    texts = [*task.prompts["prompt"], *task.labelled["completion"], *task.eval["reference"]]
    template = build_tiny_model(texts, models / "no-template")
    config = json.loads((template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (template / "tokenizer_config.json").write_text(json.dumps(config))
    (template / "chat_template.jinja").unlink(missing_ok=True)
    shutil.copytree(template, models / "no-weights", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return base


def _versions(workdir: Path) -> int:
    db = workdir / "mlflow" / "mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT count(*) FROM model_versions").fetchone()[0]
        except sqlite3.OperationalError:  # no registry tables yet
            return 0


def _run(case: Case, base: Path) -> Result:
    workdir = base / "runs" / case.id
    workdir.mkdir(parents=True)
    if case.recipe is not None:
        recipe = workdir / "recipe.yaml"
        recipe.write_text(case.recipe)
    else:
        recipe = Path(case.recipe_path) if case.recipe_path else RECIPE
    argv = [sys.executable, "-m", "flows.cli", "run", str(recipe), "--run-name", case.run_name]
    for s in [*QUICK, *case.sets]:
        argv += ["--set", s.replace("{base}", str(base))]
    env = {k: v for k, v in os.environ.items() if case.env.get(k, "") is not None}
    env |= {k: v for k, v in case.env.items() if v is not None}
    env |= {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(base), str(ROOT)]),
        "PREFECT_HOME": str(workdir / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow-default.db'}",
    }
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, f"timed out after {CASE_TIMEOUT_S} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return Result(
        rc=rc, out=out, seconds=time.monotonic() - start,
        manifests=[str(p.relative_to(workdir)) for p in workdir.rglob("_manifest.json")],
        versions=_versions(workdir),
    )


@pytest.fixture(scope="module")
def results(request, base) -> dict[str, Result]:
    """Run every selected case, two at a time, before the first assertion."""
    selected = [
        item.callspec.params["case"] for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    with ThreadPoolExecutor(2) as pool:
        return dict(zip([c.id for c in selected], pool.map(lambda c: _run(c, base), selected), strict=True))


def test_there_are_at_least_40_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_sentence_and_writes_nothing(results, case):
    r = results[case.id]
    lines = [line for line in r.out.splitlines() if line.startswith("flywheel:")]
    assert r.rc == 2, f"exit {r.rc} after {r.seconds:.1f} s:\n{r.out[-4000:]}"
    assert len(lines) == 1, r.out[-4000:]
    assert "Traceback" not in r.out, r.out[-4000:]
    for text in case.expect:
        assert text in lines[0], lines[0]
    assert r.manifests == [], r.manifests
    assert r.versions == 0


@pytest.mark.parametrize(
    "args, names",
    [(["--losses", "dpo,nope"], ["--losses", "'nope'"]), (["--set", "grow_steps=-1"], ["grow_steps"])],
    ids=["unknown-loss", "bad-override"],
)
def test_make_compare_refuses_bad_input_before_its_first_run(tmp_path, args, names):
    """``make compare`` runs nine flywheel runs: a mistake in its arguments is one sentence before the first."""
    out = tmp_path / "compare"
    proc = subprocess.run([sys.executable, "-m", "flows.compare", str(ROOT / "recipes" / "arithmetic-dpo.yaml"),
                           "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flywheel:") and all(n in lines[0] for n in names), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_serve_takes_a_cron_typed_unquoted(api, tmp_path):
    """``flywheel serve RECIPE --set "orchestration.schedule=* * * * *"``, the way anyone types a cron (each ``*``
    is a YAML alias), serves the deployment on that schedule: a value that is not YAML is taken as text."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from tests.prefect_fixtures import stop_process

    # The runner polls once, at its start, before any minute of the schedule is due: it runs no flow.
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect"), "OMP_NUM_THREADS": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "3600"}
    argv = [sys.executable, "-m", "flows.cli", "serve", str(RECIPE), "--set", "orchestration.schedule=* * * * *",
            "--set", "name=every-minute"]
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        serve = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    with get_client(sync_client=True) as client:
        try:
            while True:
                assert serve.poll() is None, f"flywheel serve exited {serve.returncode}:\n{log.read_text()[-3000:]}"
                try:
                    deployment = client.read_deployment_by_name("rest/every-minute")
                    break
                except ObjectNotFound:
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(1)
        finally:
            stop_process(serve)
        client.delete_deployment(deployment.id)  # and the runs its schedule created
    assert deployment.schedules[0].schedule.cron == "* * * * *"
    assert "Traceback" not in log.read_text()
