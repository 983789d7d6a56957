"""Training progress where no bar is drawn: ``alignment.training.reporting``, the interval's check, and
console lines that do not run into a live bar. The command-line view is in tests/test_console.py."""

from __future__ import annotations

import io

import pytest
from tqdm.auto import tqdm

from alignment.errors import UserError
from alignment.logprobs import sequence_logps, token_logps
from alignment.models import load_policy
from alignment.progress import PROGRESS_SECONDS, PROGRESS_SECONDS_ENV, progress_seconds, reporting
from alignment.samplers import SamplingParams
from alignment.samplers.hf import TransformersSampler
from alignment.training import TrainConfig, sft
from flows.console import _write

PROMPTS, COMPLETIONS = ["1+2=", "3+4=", "5+1="] * 4, ["3", "7", "6"] * 4  # 12 rows: 3 steps of 4 per epoch


def test_a_training_loop_reports_each_step_but_its_last_inside_the_block_only(tiny_model_dir, tmp_path):
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=4)
    reports, losses = [], []
    with reporting(lambda *args: reports.append(args), every=0):
        sft(tiny_model_dir, tmp_path / "a", PROMPTS, COMPLETIONS, cfg, progress=False, on_step=lambda _, loss: losses.append(loss))
    assert [(step, total, unit) for step, total, unit, _, _ in reports] == [(k, 6, "steps") for k in range(1, 6)]  # the stage reports the end
    assert [detail for *_, detail, _ in reports] == [f"loss {loss:.4g}" for loss in losses[:5]]
    seconds = [s for *_, s in reports]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    sft(tiny_model_dir, tmp_path / "b", PROMPTS, COMPLETIONS, cfg, progress=False)  # outside the block: nobody to tell
    assert len(reports) == 5


def test_the_interval_holds_reports_back(tiny_model_dir, tmp_path):
    reports = []
    with reporting(lambda *args: reports.append(args), every=3600):
        sft(tiny_model_dir, tmp_path / "a", PROMPTS, COMPLETIONS, TrainConfig(epochs=2, lr=1e-2, batch_size=4), progress=False)
    assert reports == []


def test_a_sampler_reports_the_samples_it_has_drawn(tiny_model_dir):
    reports = []
    sampler = TransformersSampler(str(tiny_model_dir), batch_size=4, progress=False)
    with reporting(lambda *args: reports.append(args), every=0):
        sampler.generate(["1+2=", "3+4=", "5+1="], 4, SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))
    assert [(done, total, unit) for done, total, unit, _, _ in reports] == [(4, 12, "samples"), (8, 12, "samples")]


def test_the_no_grad_log_prob_passes_report_the_completions_scored(tiny_model_dir):
    """The reference and old-policy passes (DPO's reference, GRPO's π_old and π_ref) can take as long as a Grow shard."""
    model, tokenizer = load_policy(tiny_model_dir)
    for scores in (token_logps, sequence_logps):
        reports = []
        with reporting(lambda *args: reports.append(args), every=0):
            scores(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=5)
        assert [(done, total, unit) for done, total, unit, _, _ in reports] == [(5, 12, "completions scored"),
                                                                              (10, 12, "completions scored")]


@pytest.mark.parametrize("value", ["often", "0", "-5", "nan", "inf", "1e999"])
def test_a_bad_interval_is_one_sentence(monkeypatch, value):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, value)
    with pytest.raises(UserError, match=f"{PROGRESS_SECONDS_ENV}={value!r} is not a positive number of seconds"):
        progress_seconds()


def test_the_interval_defaults_to_a_minute_and_takes_fractions(monkeypatch):
    monkeypatch.delenv(PROGRESS_SECONDS_ENV, raising=False)
    assert progress_seconds() == PROGRESS_SECONDS == 60
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, " 0.5 ")
    assert progress_seconds() == 0.5


def test_a_console_line_clears_a_live_bar_and_the_bar_comes_back_below_it():
    terminal = io.StringIO()
    bar = tqdm(total=10, desc="training", file=terminal, disable=False, mininterval=0)
    try:
        bar.update(3)
        _write(terminal, "warm-start · step 3 of 10")
    finally:
        bar.close()
    text = terminal.getvalue()
    before, line, after = text.partition("warm-start · step 3 of 10\n")
    assert line and before.endswith("\r")  # the bar was cleared back to the line's start, not written after
    assert "3/10" in after  # and drawn again under the line


def test_without_a_bar_a_console_line_is_plain():
    terminal = io.StringIO()
    _write(terminal, "grow g=1 · 0.1 s")
    assert terminal.getvalue() == "grow g=1 · 0.1 s\n"


def test_a_long_stage_line_is_cut_in_its_message_and_keeps_its_time():
    import logging
    import re

    from flows.console import LINE_CHARS, ROOT, StageLines

    terminal = io.StringIO()
    lines = StageLines(terminal)
    where = str(ROOT / "tasks" / "report" / "artifacts.py")  # a line flywheel's own code logs
    for text in ("published artifacts " + "a-long-run-name-" * 20, "short"):
        lines.emit(logging.LogRecord("flywheel", logging.INFO, where, 1, text, None, None))
    long, short = terminal.getvalue().splitlines()
    assert len(long) == LINE_CHARS and re.search(r"…(?= · \d+\.\d s$)", long), long
    assert re.fullmatch(r"short · \d+\.\d s", short), short
