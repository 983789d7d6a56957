"""Where things lie in the lake: the one place that spells and parses its paths, and the names allowed in them.

    {lake}/{stage}/run={run}/iteration={g}[/step={i}]/part-*.parquet     a table partition
    {lake}/models/{run}/iteration={g}/{base|checkpoint}[/step={i}]/      a model directory
    {lake}/runs/{run}/stages/{stage}/iteration={g}[/step={i}]/_manifest.json
    {lake}/runs/{run}/staging/{stage}/iteration={g}[/step={i}]/          parts not yet committed
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alignment.errors import UserError

MANIFEST = "_manifest.json"
PARTITION_KEYS = ("run", "iteration", "step")
# Stages kept as tables; every other stage (``base``, ``checkpoint``) is a model directory under ``models/``.
TABLES = ("prompts", "eval_prompts", "labelled", "samples", "scored", "decisions", "filtered", "pairs", "groups", "updates",
          "eval")
MODELS = ("base", "checkpoint")



class BadName(UserError):
    """A run or model name that could escape the lake, forge a partition or overflow a path."""


# Run names become a folder of the lake and model names a registry key: a single path segment of a
# few safe characters, so nothing typed escapes the lake (``..``, ``/``) or forges a hive partition (``=``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit and without '..'"


def check_name(name: str, what: str) -> str:
    """``name`` if it follows ``NAME_RULE``; else a ``BadName`` sentence saying which rule it breaks."""
    shown = name if len(name) <= 40 else f"{name[:40]}..."
    if not name:
        problem = "is empty"
    elif len(name) > 128:
        problem = f"is {len(name)} characters long"
    elif ".." in name:
        problem = "contains '..'"
    elif NAME_PATTERN.fullmatch(name):
        return name
    else:
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        problem = f"contains {', '.join(repr(c) for c in bad)}" if bad else "does not start with a letter or digit"
    raise BadName(f"The {what} {shown!r} {problem}: use {NAME_RULE}.")


@dataclass(frozen=True)
class Address:
    """Where one stage of one run lies: the one place that spells lake paths (``Lake.address`` parses them)."""

    root: str
    stage: str
    run: str
    iteration: int
    step: int | None = None

    @property
    def is_table(self) -> bool:
        return self.stage not in MODELS

    @property
    def partition(self) -> str:
        """``run=R/iteration=G[/step=I]``: the hive partition of a table stage."""
        return f"run={self.run}/{self._keys}"

    @property
    def label(self) -> str:
        """``filtered/step=1``: the stage within its iteration, as tables and logs name it."""
        return self.stage if self.step is None else f"{self.stage}/step={self.step}"

    @property
    def name(self) -> str:
        """``scored/run=R/iteration=G``: table and partition, the name lineage records."""
        return f"{self.stage}/{self.partition}" if self.is_table else f"models/{self.run}/{self._model_path}"

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def manifest_uri(self) -> str:
        if not self.is_table:
            return f"{self.uri}/{MANIFEST}"
        return f"{self.root}/runs/{self.run}/stages/{self.stage}/{self._keys}/{MANIFEST}"

    @property
    def staging_uri(self) -> str:
        return f"{self.root}/runs/{self.run}/staging/{self.stage}/{self._keys}"

    @property
    def _keys(self) -> str:
        return f"iteration={self.iteration}" + ("" if self.step is None else f"/step={self.step}")

    @property
    def _model_path(self) -> str:
        return f"iteration={self.iteration}/{self.label}"


_TABLE_PATH = re.compile(r"(?P<stage>[a-z_]+)/run=(?P<run>[^/]+)/iteration=(?P<iteration>\d+)(?:/step=(?P<step>\d+))?")
_MODEL_PATH = re.compile(r"models/(?P<run>[^/]+)/iteration=(?P<iteration>\d+)/(?P<stage>[a-z_]+)(?:/step=(?P<step>\d+))?")
_MANIFEST_PATH = re.compile(
    r"runs/(?P<run>[^/]+)/stages/(?P<stage>[a-z_]+)/iteration=(?P<iteration>\d+)(?:/step=(?P<step>\d+))?/" + re.escape(MANIFEST)
)


def parse(root: str, uri: str) -> Address | None:
    """The stage a table partition, model directory or manifest URI under ``root`` names; None for any other URI."""
    prefix = root.rstrip("/") + "/"
    if not uri.startswith(prefix):
        return None
    rel = uri[len(prefix) :].rstrip("/")
    for pattern in (_TABLE_PATH, _MODEL_PATH, _MANIFEST_PATH):
        m = pattern.fullmatch(rel)
        if m and (pattern is _MODEL_PATH) == (m["stage"] in MODELS):
            step = int(m["step"]) if m["step"] is not None else None
            return Address(root, m["stage"], m["run"], int(m["iteration"]), step)
    return None
