"""Rewards: plain functions ``(prompts, completions, references) -> list[float]``.

Built-ins are chosen by name; a user's own reward by import path ``"package.module:function"``,
so a new task needs no change to flywheel. Every reward's output is checked: a wrong length,
NaN or inf is an error that names the offending rows, never a silently corrupted dataset.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence

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


def score(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Call a reward and check it returned one finite float per row."""
    name = getattr(fn, "__qualname__", repr(fn))
    rewards = list(fn(list(prompts), list(completions), list(references)))
    if len(rewards) != len(completions):
        raise RewardError(
            f"Reward {name} returned {len(rewards)} values for {len(completions)} completions; "
            "it must return exactly one float per completion."
        )
    bad = []
    for i, r in enumerate(rewards):
        try:
            value = float(r)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            bad.append(i)
        rewards[i] = value
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise RewardError(
            f"Reward {name} returned a non-finite value (NaN, inf or not a number) for {len(bad)} row(s): {shown} "
            f"(first: prompt {prompts[bad[0]]!r}, completion {completions[bad[0]]!r}); rewards must be finite floats."
        )
    return rewards
