"""Rewards: plain functions ``(prompts, completions, references) -> list[float]``.

Built-ins are chosen by name; a user's own reward by import path ``"package.module:function"``,
so a new task needs no change to flywheel. Every reward's output is checked: a wrong length, a
value that is not a number (a string such as "1.0", a boolean, None), NaN or inf is an error that
names the reward and the first offending row, never a silently corrupted dataset. A reward that
raises is one ``RewardError`` naming it and the exception (never retried), and ``with_timeout``
bounds how long one call may take.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from alignment.errors import UserError

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], Sequence[float]]


class RewardError(UserError):
    """A reward could not be found, or returned something that is not one finite float per row."""


def exact_match(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the completion equals the reference (surrounding whitespace ignored), else 0.0."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references, strict=True)]


def contains_reference(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the reference appears anywhere in the completion, else 0.0."""
    return [float(r.strip() in c) for c, r in zip(completions, references, strict=True)]


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+−]?\.\d+")


def parse_number(text: str | None) -> float | None:
    """The answer's number: the last ``\\boxed{…}`` if any, else the last number in the text.

    Thousands separators (``1,200``), signs (``-3``, ``+3``, the minus sign ``−3``) and decimals
    (``2.50``, ``.5``) are handled; ``None`` when there is no number.
    """
    if not text:
        return None
    boxed = _BOXED.findall(text)
    source = boxed[-1] if boxed else text
    found = _NUMBER.findall(source)
    if not found:
        return None
    raw = found[-1].replace(",", "").replace("−", "-")
    try:
        return float(raw)
    except ValueError:
        return None


def numeric_match(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the completion's final number (or ``\\boxed{}`` answer) equals the reference's number."""
    out = []
    for c, r in zip(completions, references, strict=True):
        want, got = parse_number(r), parse_number(c)
        out.append(float(want is not None and got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)))
    return out


def regex_match(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the whole completion (surrounding whitespace ignored) matches the reference as a regular expression."""
    out = []
    for c, r in zip(completions, references, strict=True):
        try:
            pattern = re.compile(r)
        except re.error as exc:
            raise RewardError(f"regex_match: the reference {r!r} is not a regular expression ({exc}); fix the reference column.") from None
        out.append(float(pattern.fullmatch(c.strip()) is not None))
    return out


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "contains_reference": contains_reference,
    "numeric_match": numeric_match,
    "regex_match": regex_match,
}


def resolve_reward(spec: str) -> RewardFn:
    """Return the reward named ``spec``: a built-in name or ``"package.module:function"``."""
    if ":" not in spec:
        if spec not in REWARDS:
            raise RewardError(
                f"Unknown reward {spec!r}: use one of {sorted(REWARDS)} or an import path 'package.module:function'."
            )
        return REWARDS[spec]
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import error in the user's module is theirs to see in full
        raise RewardError(
            f"Could not import reward module {module_name!r} from {spec!r} ({type(exc).__name__}: {exc}); "
            "check that the module is on PYTHONPATH and imports cleanly."
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(
            f"Reward {spec!r}: module {module_name!r} has no callable {attr!r}; "
            "point to a function (prompts, completions, references) -> list[float]."
        )
    return fn


class TimedReward:
    """A reward whose every call must return within ``timeout_s`` seconds (``recipe.reward_timeout_s``).

    The call runs in a daemon worker thread and is waited for. Python cannot stop a thread, so a call
    that overruns is abandoned, not killed: it keeps its CPU (or GPU) until it returns or the process
    exits, and the run stops at once with a ``RewardError`` naming the reward and the setting.
    """

    def __init__(self, fn: RewardFn, timeout_s: float):
        self.fn, self.timeout_s = fn, timeout_s

    def __repr__(self) -> str:
        return reward_name(self.fn)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> Any:
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["value"] = self.fn(prompts, completions, references)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=call, name=f"reward {self!r}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise RewardError(
                f"Reward {self!r} did not return within {self.timeout_s:g} s for {len(completions)} completions; "
                "make it faster or raise reward_timeout_s in the recipe."
            )
        if "error" in box:
            raise box["error"]
        return box["value"]


def with_timeout(fn: RewardFn, timeout_s: float | None) -> RewardFn:
    """``fn`` bounded by ``timeout_s`` seconds per call (``None``: unbounded)."""
    return fn if timeout_s is None else TimedReward(fn, timeout_s)


def reward_name(fn: RewardFn) -> str:
    """How errors name a reward: a function's qualified name, else the object's repr."""
    return getattr(fn, "__qualname__", None) or repr(fn)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number (int, float, numpy or torch scalar); ``None`` for strings,
    booleans, None and anything else, which ``float()`` would otherwise read or fail on."""
    if isinstance(value, str | bytes | bool) or type(value).__name__ in ("bool", "bool_") or not hasattr(value, "__float__"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):  # e.g. a tensor of more than one element
        return None


def score(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Call a reward and check it returned one finite number per row; any failure is one ``RewardError``."""
    name = reward_name(fn)
    try:
        result = fn(list(prompts), list(completions), list(references))
    except UserError:
        raise
    except Exception as exc:
        raise RewardError(
            f"Reward {name} raised {type(exc).__name__}: {_one_line(str(exc)) or '(no message)'}; "
            "fix the reward (a reward's error is not retried)."
        ) from exc
    if isinstance(result, str | bytes | dict) or not hasattr(result, "__iter__"):
        raise RewardError(f"Reward {name} returned {type(result).__name__}, not a list of one number per completion.")
    rewards = list(result)
    if len(rewards) != len(completions):
        raise RewardError(
            f"Reward {name} returned {len(rewards)} values for {len(completions)} completions; "
            "it must return exactly one float per completion."
        )
    values = [_number(r) for r in rewards]
    bad = [i for i, v in enumerate(values) if v is None or not math.isfinite(v)]
    if bad:
        first = bad[0]
        what = (
            "a non-finite value (NaN or inf)" if values[first] is not None
            else f"{_one_line(repr(rewards[first]), 60)} ({type(rewards[first]).__name__}), not a number,"
        )
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise RewardError(
            f"Reward {name} returned {what} for {len(bad)} row(s): {shown} "
            f"(first: prompt {_one_line(repr(prompts[first]), 80)}, completion {_one_line(repr(completions[first]), 80)}); "
            "rewards must be finite numbers, not strings, booleans or None."
        )
    return values
