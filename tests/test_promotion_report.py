"""Step metrics in MLflow and summary.json, the promotion guards, and the HTML report, on real demo runs.

Two short runs through ``flywheel run``: a clean one (training reward ``numeric_match``, verifier
``exact_match``, every guard on) whose first step is promoted, and one trained on a hackable reward
that pays for answers starting with "1" — a surface feature, as a reward model might prefer — with
``exact_match`` as the verifier: the gap between the two widens and the ``reward_gap`` guard blocks
the promotion. The report of the clean run is parsed here, and opened in headless Chromium when
Chromium and Playwright are installed (the stack tier installs them).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from alignment.rewards import exact_match
from flows.cli import main
from flywheel_helpers import FAST, MODEL, RECIPE, client_for, flywheel, one_torch_thread, summary_of, tracking_uri  # noqa: F401

ONE_STEP = [*FAST, "grow_steps=1"]
GUARDS = ["promotion.max_length_drift=0.5", "promotion.max_kl=5.0", "promotion.max_reward_gap_widening=0.1"]
STEP_KEYS = {
    "grown_reward_mean", "grown_reward_std", "grown_reward_p10", "grown_reward_p50", "grown_reward_p90",
    "kept_reward_mean", "kept_reward_std", "kept_reward_p10", "kept_reward_p50", "kept_reward_p90",
    "kept_fraction", "prompt_coverage", "pass_at_1", "pass_at_n", "grown_length_mean", "grown_length_p90",
    "grown_truncated", "kept_length_mean", "kept_length_p90", "eval_length_mean", "eval_length_p90", "eval_truncated",
    "duplicates_dropped", "win_rate", "eval_kl", "eval_train_reward", "grow_samples_per_s", "grow_tokens_per_s",
    "seconds_grow", "seconds_score", "seconds_filter", "seconds_train", "seconds_evaluate", "seconds_register",
}


def starts_with_one(prompts, completions, references):
    """A hackable training reward: exact match, plus 2 for any answer that starts with "1"."""
    return [m + 2.0 * c.strip().startswith("1") for m, c in zip(exact_match(prompts, completions, references), completions)]


def _run(tmp_path_factory, name: str, *sets: str) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.chdir(workdir)
        assert flywheel(RECIPE, *ONE_STEP, *sets, run=name) == 0
    (workdir / "console.txt").write_text(out.getvalue())
    return workdir


# The clean run starts from a warm start that has learned the task (held-out accuracy about 0.6 with
# seed 0), so its one Improve step rises by tens of points, not by the one or two held-out prompts that
# FAST's weaker start moves by and that another CPU's float rounding can take back.
CLEAN = ["task.n_labelled=200", "warm_start.epochs=30", "task.n_prompts=150", "task.n_eval=100", "improve.epochs=3"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "clean", *CLEAN, "reward=numeric_match", "eval.reward=exact_match", *GUARDS)


@pytest.fixture(scope="module")
def hacked(tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "hacked", "reward=test_promotion_report:starts_with_one", "eval.reward=exact_match",
                "filter.kind=fixed", "filter.threshold=2.0", "grow.include_labelled=false", "improve.epochs=4", *GUARDS)


def test_a_clean_run_is_promoted_with_every_check_passed(clean):
    row = summary_of(clean, "clean")["iterations"][0]
    assert row["promoted"] and row["blocked_by"] == []
    assert set(row["promotion"]) == {"improvement", "length_drift", "kl", "reward_gap"}
    assert all(c["passed"] and c["value"] is not None for c in row["promotion"].values())
    version = client_for(clean).get_model_version("arithmetic-rest", row["model_version"])
    assert json.loads(version.tags["flywheel.promotion.kl"]) == row["promotion"]["kl"]


def test_a_clean_run_logs_every_step_metric_to_mlflow_and_the_summary(clean):
    doc = summary_of(clean, "clean")
    row = doc["iterations"][0]
    assert STEP_KEYS <= set(row), STEP_KEYS - set(row)
    client = client_for(clean)
    parent = client.get_run(doc["mlflow"]["run_id"]).data.metrics
    assert STEP_KEYS <= set(parent), STEP_KEYS - set(parent)
    assert parent["win_rate"] == row["win_rate"] and 0 <= row["win_rate"] <= 1
    history = client.get_metric_history(doc["mlflow"]["run_id"], "kept_fraction")
    assert [m.step for m in history] == [100 * 1 + 1]  # the parent's step axis: iteration * 100 + step
    # the figures' cost: the step metrics and the KL/training-reward pass in evaluation
    cost = row["seconds_metrics"] + row["seconds_eval_extras"]
    assert cost < sum(row[f"seconds_{s}"] for s in ("grow", "score", "filter", "train", "evaluate", "register"))


def test_a_hacked_reward_is_blocked_by_the_reward_gap_guard(hacked):
    row = summary_of(hacked, "hacked")["iterations"][0]
    gap = row["promotion"]["reward_gap"]
    assert not row["promoted"] and "reward_gap" in row["blocked_by"]
    assert gap["value"] > gap["limit"] == 0.1 and not gap["passed"]
    assert row["eval_train_reward"] - row["eval_reward"] > 0.1  # the training reward ran away from the verifier
    version = client_for(hacked).get_model_version("arithmetic-rest", row["model_version"])
    assert json.loads(version.tags["flywheel.promotion.reward_gap"])["passed"] is False
    assert version.tags["flywheel.promoted"] == "false"
    table = (hacked / "console.txt").read_text()
    assert re.search(rf"\b{row['model_version']} \([a-z_,]*reward_gap", table), table


def _report(workdir: Path, run: str) -> str:
    out = workdir / f"{run}.html"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", run, "--lake", f"file://{workdir / 'lake'}", "--out", str(out)]) == 0
    return out.read_text()


def test_the_report_has_every_section_with_inline_plots(clean):
    from tasks.report.html import SECTIONS

    page = _report(clean, "clean")
    for key in SECTIONS:
        section = re.search(rf'<section id="{key}">(.*?)</section>', page, re.S)
        assert section, key
        if key not in ("promotion", "samples"):
            assert '<img alt="plot" src="data:image/png;base64,' in section.group(1), key
    assert page.count('src="data:image/png;base64,') >= 8
    assert "below_threshold" in page and "length_drift" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    artifact = summary_of(clean, "clean")["report"]
    assert artifact.endswith("/report/clean-report.html") and Path(artifact.removeprefix("file://")).exists()


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists() or not shutil.which("chromium"), reason="no Chromium")
def test_the_report_renders_in_headless_chromium(clean, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (make test-stack)")
    from tasks.report.html import SECTIONS

    out = clean / "clean-browser.html"
    out.write_text(_report(clean, "clean"))
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args, headless=True)
        try:
            page = browser.new_page()
            page.goto(out.as_uri())
            for key in SECTIONS:
                assert page.locator(f"section#{key} h2").is_visible(), key
            sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            assert len(sizes) >= 8 and all(done and width > 0 for done, width in sizes), sizes
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_version_registered_before_the_tracking_move_still_loads(clean, tmp_path):
    """A registered version's entry file is frozen at registration: older ones import ``tasks.policy_model``."""
    import mlflow

    uri = tracking_uri(clean)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}@champion", dst_path=str(tmp_path)))
    entries = list(model_dir.rglob("policy_entry.py"))
    assert entries, sorted(p.name for p in model_dir.rglob("*"))
    for entry in entries:  # as a version registered before the move wrote it
        entry.write_text(entry.read_text().replace("from tasks.tracking.policy_model import", "from tasks.policy_model import"))
        assert "from tasks.policy_model import FlywheelPolicy" in entry.read_text()
    model = mlflow.pyfunc.load_model(str(model_dir))
    assert len(model.predict(["12+3="], params={"max_new_tokens": 5})) == 1
