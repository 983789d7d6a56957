"""Rewards: plain functions ``(prompts, completions, references) -> list[float]``.

Built-ins are chosen by name; a user's own reward by import path ``"package.module:function"``,
so a new task needs no change to flywheel. Every reward's output is checked: a wrong length, a
value that is not a number (a string such as "1.0", a boolean, None), NaN or inf is an error that
names the reward and the first offending row, never a silently corrupted dataset. A reward that
raises is one ``RewardError`` naming it and the exception (never retried), and ``with_timeout``
bounds how long one call may take.

A reward *spec* (``recipe.reward``) is a name, an import path, ``rm:PATH`` (a Bradley–Terry reward
model, ``alignment.reward_model``, loaded only when used) or an ensemble of specs:
``Ensemble(members, reduce="min")`` is pessimism by ensemble (a lower-confidence-bound reward, as in
Xiong et al., arXiv 2312.11456): ``r_hat(x, a) = min_k r_k(x, a)`` over independently trained
reward models; ``"mean"`` averages instead. Members are combined as they are, with no rescaling:
give it rewards on one scale.
"""

from __future__ import annotations

import contextvars
import importlib
import math
import re
import statistics
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

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

        # The call sees the caller's context (a stage's progress block, the Prefect run it logs to).
        worker = threading.Thread(target=contextvars.copy_context().run, args=(call,), name=f"reward {self!r}", daemon=True)
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
    """How errors name a reward: a user's function as a recipe spells it (``module:function``), a built-in
    by its name, anything else by its repr."""
    name = getattr(fn, "__qualname__", None)
    if name is None:
        return repr(fn)
    module = getattr(fn, "__module__", None) or ""
    return name if not module or module.startswith("alignment.") else f"{module}:{name}"


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
            f"Reward {name} raised {type(exc).__name__}: {_one_line(str(exc)) or '(no message)'} (called on "
            f"{len(completions)} completions); fix the reward (a reward's error is not retried)."
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

# -- specs: a name, an import path, a reward model or an ensemble -----------------------------------
RewardSpec = Union[str, Sequence["RewardSpec"], Mapping[str, object]]

REDUCTIONS: dict[str, Callable[[Sequence[float]], float]] = {"min": min, "mean": statistics.fmean}


class Ensemble:
    """Several rewards combined per row: ``min`` is pessimism, ``r_hat = min_k r_k`` (arXiv 2312.11456); or ``mean``."""

    def __init__(self, members: Sequence[RewardFn], reduce: str = "min"):
        if not members:
            raise RewardError("An ensemble needs at least one member reward.")
        if reduce not in REDUCTIONS:
            raise RewardError(f"Unknown ensemble reduce {reduce!r}: use one of {sorted(REDUCTIONS)}.")
        self.members = list(members)
        self.reduce = reduce

    def __repr__(self) -> str:
        return f"Ensemble({self.members!r}, reduce={self.reduce!r})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str]) -> list[float]:
        # ``score`` checks each member, so a bad value names the member that produced it.
        columns = [score(member, prompts, completions, references) for member in self.members]
        combine = REDUCTIONS[self.reduce]
        return [combine(row) for row in zip(*columns, strict=True)]


def resolve_reward_spec(spec: RewardSpec) -> RewardFn:
    """A reward from a spec, extending ``rewards.resolve_reward``.

    - ``"exact_match"`` or ``"package.module:function"``: as ``resolve_reward``;
    - ``"rm:/path/to/model"``: ``RewardModel`` over a saved reward-model directory;
    - ``[spec, ...]``: ``Ensemble`` with ``reduce="min"`` (pessimism);
    - ``{"ensemble": [spec, ...], "reduce": "min" | "mean"}``: ``Ensemble`` with that reduce.
    """
    if isinstance(spec, str):
        return _reward_model(spec.removeprefix("rm:")) if spec.startswith("rm:") else resolve_reward(spec)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"ensemble", "reduce"})
        if unknown or "ensemble" not in spec:
            raise RewardError(
                f"A reward ensemble is {{'ensemble': [spec, ...], 'reduce': 'min' | 'mean'}}; got keys {sorted(spec)}."
            )
        return _ensemble(spec["ensemble"], str(spec.get("reduce", "min")))
    if isinstance(spec, Sequence):
        return _ensemble(spec, "min")
    raise RewardError(
        f"A reward spec is a name, 'module:function', 'rm:PATH', a list or an ensemble dict; got {type(spec).__name__}."
    )


def check_reward_spec(spec: RewardSpec) -> None:
    """Resolve a spec the cheap way, before anything runs: names and import paths are imported, a
    reward model's directory is checked but not loaded; a mistake is one ``RewardError`` sentence."""
    if isinstance(spec, str) and spec.startswith("rm:"):
        if not (Path(spec[3:]) / "config.json").is_file():
            _reward_model(spec[3:])  # raises the sentence naming the path
        return
    if isinstance(spec, str) or not isinstance(spec, Sequence | Mapping):
        resolve_reward_spec(spec)  # a name or an import path; anything else raises the sentence naming its type
        return
    if isinstance(spec, Mapping):
        if sorted(spec) not in (["ensemble"], ["ensemble", "reduce"]):
            raise RewardError(
                f"A reward ensemble is {{'ensemble': [spec, ...], 'reduce': 'min' | 'mean'}}; got keys {sorted(spec)}."
            )
        if str(spec.get("reduce", "min")) not in REDUCTIONS:
            raise RewardError(f"Unknown ensemble reduce {spec.get('reduce')!r}: use one of {sorted(REDUCTIONS)}.")
        spec = spec["ensemble"]
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise RewardError(f"An ensemble's members must be a non-empty list of reward specs, got {spec!r}.")
    for member in spec:
        check_reward_spec(member)


def _ensemble(members: object, reduce: str) -> Ensemble:
    if isinstance(members, str) or not isinstance(members, Sequence):
        raise RewardError(f"An ensemble's members must be a list of reward specs, got {members!r}.")
    return Ensemble([resolve_reward_spec(m) for m in members], reduce=reduce)


def _reward_model(path: str):
    if not (Path(path) / "config.json").is_file():
        raise RewardError(
            f"Reward 'rm:{path}': no reward model there (expected a directory with config.json, "
            "as written by train_reward_model)."
        )
    from alignment.reward_model import RewardModel  # torch and transformers: only for a reward model

    return RewardModel(path)


def uses_reward_model(spec: object) -> bool:
    """Whether the spec, or a member of its ensemble, is a reward model (``rm:PATH``)."""
    if isinstance(spec, str):
        return spec.startswith("rm:")
    if isinstance(spec, Mapping):
        return uses_reward_model(spec.get("ensemble"))
    return isinstance(spec, Sequence) and any(uses_reward_model(s) for s in spec)
