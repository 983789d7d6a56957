"""Rewards: the built-ins, a user's reward found by import path, and one clear sentence for each mistake."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from alignment.rewards import (
    REWARDS,
    RewardError,
    contains_reference,
    exact_match,
    numeric_match,
    regex_match,
    resolve_reward,
    score,
    with_timeout,
)

HERE = Path(__file__).resolve().parent


def partial_credit(prompts, completions, references):
    """A user's reward: the fraction of reference positions the completion matches."""
    return [sum(a == b for a, b in zip(c, r)) / max(len(r), 1) for c, r in zip(completions, references)]


def returns_numpy(prompts, completions, references):
    return np.array([len(c) for c in completions], dtype=np.int64)


NOT_A_FUNCTION = 3.0


def one_sentence(message: str) -> bool:
    """One line, ending in a full stop, with no second sentence started inside it."""
    return "\n" not in message and message.endswith(".") and re.search(r"[.!?]\s+[A-Z]", message) is None


# -- built-ins ---------------------------------------------------------------------------------


def test_exact_match_ignores_surrounding_whitespace_only():
    completions = ["42", " 42\n", "4", "420", "4 2", ""]
    assert exact_match(["p"] * 6, completions, ["42"] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert exact_match(["p"], ["42"], [" 42 "]) == [1.0]
    assert all(type(r) is float for r in exact_match(["p"], ["1"], ["1"]))


def test_contains_reference_finds_the_reference_anywhere():
    completions = ["the answer is 42.", "42", "4 2", "24", "1421"]
    assert contains_reference(["p"] * 5, completions, [" 42 "] * 5) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_built_ins_resolve_by_name():
    assert set(REWARDS) == {"exact_match", "contains_reference", "numeric_match", "regex_match"}
    assert resolve_reward("exact_match") is exact_match
    assert resolve_reward("contains_reference") is contains_reference
    assert resolve_reward("numeric_match") is numeric_match and resolve_reward("regex_match") is regex_match


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("Nina has 12 apples, gives 5, so 7 are left. The answer is 7", "7", 1.0),
        ("so the total is 1,200 dollars.", "1200", 1.0),
        ("It costs $2.50", "2.5", 1.0),
        ("The temperature is -3 degrees", "-3", 1.0),
        ("minus sign: −4", "-4", 1.0),
        (r"First 3, then \boxed{42}, check 41", "42", 1.0),
        ("The answer is 8", "#### 7", 0.0),
        ("no number here", "7", 0.0),
        ("7", "no number", 0.0),
        ("0.5", ".5", 1.0),
        ("12 then 13", "12", 0.0),  # the last number is the answer
    ],
)
def test_numeric_match_reads_the_final_number(completion, reference, expected):
    assert numeric_match([""], [completion], [reference]) == [expected]


def test_regex_match_matches_the_whole_completion():
    assert regex_match(["", "", ""], [" 42 ", "421", "yes"], [r"4\d", r"4\d", "yes|no"]) == [1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="not a regular expression"):
        regex_match([""], ["x"], ["("])


# -- a user's reward by import path ------------------------------------------------------------


def test_reward_from_this_test_module_by_import_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    fn = resolve_reward("test_rewards:partial_credit")
    assert fn.__name__ == "partial_credit"
    assert score(fn, ["abc>", "ab>"], ["cba", "xa"], ["cba", "ba"]) == [1.0, 0.5]


def test_reward_from_a_package_module_by_dotted_import_path(tmp_path, monkeypatch):
    pkg = tmp_path / "my_task_pkg"
    (pkg / "rewards").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards" / "__init__.py").write_text("")
    (pkg / "rewards" / "length.py").write_text(
        "def shorter_is_better(prompts, completions, references):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_task_pkg", raising=False)
    fn = resolve_reward("my_task_pkg.rewards.length:shorter_is_better")
    assert score(fn, ["p", "p"], ["", "abc"], ["r", "r"]) == [1.0, 0.25]


def test_score_converts_to_python_floats_and_passes_lists():
    seen = {}

    def spy(prompts, completions, references):
        seen["types"] = (type(prompts), type(completions), type(references))
        return (1, np.float32(0.5), np.int64(2))

    assert score(spy, ("a", "b", "c"), ("x", "y", "z"), ("r", "s", "t")) == [1.0, 0.5, 2.0]
    assert seen["types"] == (list, list, list)
    out = score(returns_numpy, ["p", "p"], ["ab", ""], ["r", "r"])
    assert out == [2.0, 0.0] and all(type(v) is float for v in out)


# -- mistakes: one sentence each, naming what was wrong ------------------------------------------


def test_unknown_reward_name_lists_the_built_ins():
    with pytest.raises(RewardError) as err:
        resolve_reward("exact-match")
    message = str(err.value)
    assert "'exact-match'" in message and "exact_match" in message and "contains_reference" in message
    assert "package.module:function" in message
    assert one_sentence(message), message


def test_missing_reward_module_names_the_module(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(RewardError) as err:
        resolve_reward("no_such_module_xyz:reward")
    message = str(err.value)
    assert "'no_such_module_xyz'" in message and "ModuleNotFoundError" in message and "PYTHONPATH" in message
    assert one_sentence(message), message


def test_reward_module_that_fails_on_import_shows_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_mod.py").write_text("x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError) as err:
        resolve_reward("broken_reward_mod:reward")
    message = str(err.value)
    assert "'broken_reward_mod'" in message and "ZeroDivisionError" in message and "division by zero" in message
    assert one_sentence(message), message


@pytest.mark.parametrize("attr", ["no_such_function", "NOT_A_FUNCTION"])
def test_reward_path_to_something_not_callable_names_it(attr, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(RewardError) as err:
        resolve_reward(f"test_rewards:{attr}")
    message = str(err.value)
    assert f"'test_rewards:{attr}'" in message and f"no callable '{attr}'" in message
    assert one_sentence(message), message


@pytest.mark.parametrize("returned", [[1.0], [1.0, 1.0, 1.0, 1.0], []])
def test_wrong_length_names_both_counts(returned):
    def too_few_or_many(prompts, completions, references):
        return returned

    with pytest.raises(RewardError) as err:
        score(too_few_or_many, ["a", "b", "c"], ["x", "y", "z"], ["r", "s", "t"])
    message = str(err.value)
    assert f"returned {len(returned)} values for 3 completions" in message
    assert "too_few_or_many" in message
    assert one_sentence(message), message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "high", np.nan])
def test_non_finite_reward_names_the_rows(bad):
    def sometimes_bad(prompts, completions, references):
        return [0.5, bad, 1.0, bad]

    with pytest.raises(RewardError) as err:
        score(sometimes_bad, ["p0", "p1", "p2", "p3"], ["c0", "c1", "c2", "c3"], ["r"] * 4)
    message = str(err.value)
    assert "2 row(s): 1, 3" in message
    assert "prompt 'p1'" in message and "completion 'c1'" in message
    assert "sometimes_bad" in message and "finite" in message
    assert one_sentence(message), message


@pytest.mark.parametrize(("bad", "shown"), [("1.0", "'1.0' (str)"), (True, "True (bool)"), (np.bool_(False), "np.False_ (bool)")])
def test_strings_and_booleans_are_not_rewards(bad, shown):
    """``float("1.0")`` and ``float(True)`` would pass silently: a reward must return numbers."""

    def wrong_type(prompts, completions, references):
        return [0.5, bad, bad]

    with pytest.raises(RewardError) as err:
        score(wrong_type, ["p0", "p1", "p2"], ["c0", "c1", "c2"], ["r"] * 3)
    message = str(err.value)
    assert f"wrong_type returned {shown}, not a number, for 2 row(s): 1, 2" in message, message
    assert one_sentence(message), message


@pytest.mark.parametrize("returned", [None, "1.0", 3.0])
def test_a_reward_that_returns_no_list_is_named(returned):
    def no_list(prompts, completions, references):
        return returned

    with pytest.raises(RewardError, match=f"no_list returned {type(returned).__name__}, not a list"):
        score(no_list, ["p"], ["c"], ["r"])


def test_a_reward_that_raises_is_one_reward_error_naming_it_and_the_exception():
    def broken(prompts, completions, references):
        raise KeyError("answer\nwith a second line")

    with pytest.raises(RewardError) as err:
        score(broken, ["p"], ["c"], ["r"])
    message = str(err.value)
    assert "broken raised KeyError: 'answer\\nwith a second line'" in message, message
    assert isinstance(err.value.__cause__, KeyError) and "\n" not in message


def test_a_reward_that_never_returns_is_abandoned_after_its_timeout():
    import threading
    import time

    release = threading.Event()

    def stuck(prompts, completions, references):
        release.wait(30)
        return [1.0] * len(completions)

    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        score(with_timeout(stuck, 0.3), ["p", "q"], ["c", "d"], ["r", "s"])
    release.set()
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "stuck did not return within 0.3 s for 2 completions" in message and "reward_timeout_s" in message
    assert one_sentence(message), message
    # In time, a bounded reward is the reward; its errors keep their name.
    assert score(with_timeout(exact_match, 5), ["p"], ["1"], ["1"]) == [1.0]
    with pytest.raises(RewardError, match="nan_everywhere returned a non-finite value"):
        score(with_timeout(nan_everywhere, 5), ["p"], ["c"], ["r"])


def nan_everywhere(prompts, completions, references):
    return [math.nan] * len(completions)


def test_many_non_finite_rewards_are_summarised():
    def all_nan(prompts, completions, references):
        return [math.nan] * len(completions)

    with pytest.raises(RewardError) as err:
        score(all_nan, ["p"] * 25, ["c"] * 25, ["r"] * 25)
    message = str(err.value)
    assert "25 row(s): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 ..." in message
    assert one_sentence(message), message


def test_reward_errors_are_value_errors_the_cli_reports():
    from flows.errors import USER_ERRORS

    assert issubclass(RewardError, ValueError)
    assert RewardError in USER_ERRORS
