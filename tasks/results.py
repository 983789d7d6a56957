"""What stage tasks hand back to the flows: small frozen values, never frames or models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignment.metrics import blocked_by


@dataclass(frozen=True)
class Selection:
    """What a filter or pair step selected: its committed stage, and how many rows (samples or pairs) it holds of how many were scored."""

    uri: str
    kept: int
    samples: int


@dataclass(frozen=True)
class Registration:
    """A registered model version and the champion decision made for it."""

    model_name: str
    model_version: str
    promoted: bool
    champion_version: str
    champion_reward: float | None
    promotion: dict[str, dict[str, Any]] = field(default_factory=dict)  # check -> {value, limit, passed}

    @property
    def blocked_by(self) -> list[str]:
        """The promotion checks that failed, in the gate's order (empty: nothing blocked it)."""
        return blocked_by(self.promotion)
