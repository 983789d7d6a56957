"""The plot helpers both the HTML report and the MLflow plots draw with: what lands on the axes, exactly."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from tasks.report import plots

SUMMARY = {
    "baseline": {"eval_reward": 0.4, "eval_accuracy": 0.4, "model_version": "1"},
    "iterations": [
        {"iteration": 1, "step": 1, "eval_reward": 0.6, "eval_accuracy": None, "promoted": True},
        {"iteration": 1, "step": 2, "eval_reward": None, "skipped": "no rows kept"},
        {"iteration": 2, "step": 1, "eval_reward": 0.5, "eval_accuracy": 0.5, "promoted": False},
    ],
}


def test_steps_are_the_baseline_and_every_evaluated_step():
    rows = plots.steps(SUMMARY)
    assert [(r["label"], r["eval_reward"], r["promoted"]) for r in rows] == [("0", 0.4, True), ("1.1", 0.6, True), ("2.1", 0.5, False)]
    assert plots.steps({}) == []


def test_lines_draw_one_line_per_key_with_gaps_for_missing_figures():
    fig, ax = plots.figure(title="t", xlabel="iteration.step", ylabel="reward", grid=True)
    plots.lines(ax, plots.steps(SUMMARY), {"eval_reward": "reward", "eval_accuracy": "accuracy"},
                {"eval_accuracy": {"marker": "x", "linestyle": "--"}})
    reward, accuracy = ax.get_lines()
    assert (reward.get_label(), reward.get_marker(), list(reward.get_ydata())) == ("reward", "o", [0.4, 0.6, 0.5])
    assert (accuracy.get_marker(), accuracy.get_linestyle()) == ("x", "--")
    assert accuracy.get_ydata()[0] == 0.4 and math.isnan(accuracy.get_ydata()[1])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1.1", "2.1"]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("t", "iteration.step", "reward")


def test_own_rewards_leave_demonstrations_and_missing_rewards_out():
    frame = pl.DataFrame({"sample_idx": [0, 1, 2, -1], "reward": [0.5, None, 1.0, 1.0]})
    assert plots.own_rewards(frame).tolist() == [0.5, 1.0]


def test_histograms_as_shares_over_a_common_range():
    fig, ax = plots.figure()
    series = {"a": np.array([0.0, 0.0, 1.0, 1.0]), "b": np.array([0.5, 2.0])}
    plots.histograms(ax, series, shares=True, common_range=True)
    a, b = ax.containers
    assert len(a) == len(b) == plots.BINS
    assert sum(p.get_height() for p in a) == pytest.approx(1.0) and sum(p.get_height() for p in b) == pytest.approx(1.0)
    assert [p.get_x() for p in a] == [p.get_x() for p in b]  # the same bins: from 0 to 2 for both
    assert a[0].get_x() == pytest.approx(0.0, abs=1e-12) and b[-1].get_x() + b[-1].get_width() == pytest.approx(2.0)


def test_histograms_of_equal_values_over_a_common_range_are_one_bin():
    fig, ax = plots.figure()
    plots.histograms(ax, {"a": np.array([1.0, 1.0, 1.0])}, common_range=True)
    (bars,) = ax.containers
    assert [(p.get_x(), p.get_height()) for p in bars] == [(1.0, 3.0)]


def test_histograms_without_a_common_range_bin_each_series_over_its_own():
    fig, ax = plots.figure()
    plots.histograms(ax, {"a": np.array([0.0, 1.0]), "b": np.array([0.0, 4.0])})
    a, b = ax.containers
    assert a[-1].get_x() + a[-1].get_width() == pytest.approx(1.0) and b[-1].get_x() + b[-1].get_width() == pytest.approx(4.0)
    assert [p.get_height() for p in a] == [1.0] + [0.0] * 18 + [1.0]
