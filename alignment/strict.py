"""The base of every recipe section: unknown keys are errors, and counts, numbers and switches are read strictly.

Pydantic's lax mode would read ``true`` as the count 1 or ``"4"`` as 4; a recipe is typed by hand and
overridden from a shell, so those slips are errors that name the key instead.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Strict(BaseModel):
    """Forbids unknown keys, and reads counts, numbers and switches strictly (``_strict_scalar``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if value is None:
            return value
        if typing.get_origin(annotation) is dict and isinstance(value, dict):
            kinds = _scalar_kinds(typing.get_args(annotation)[1])
            return {k: _strict_scalar(v, kinds, f" for {k!r}") for k, v in value.items()} if kinds else value
        kinds = _scalar_kinds(annotation)
        return _strict_scalar(value, kinds) if kinds else value


def _scalar_kinds(annotation: Any) -> set[type]:
    """Which of int, float and bool a field takes (through ``X | None``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_scalar_kinds(a) for a in typing.get_args(annotation)))
    return {annotation} & {int, float, bool}


def _strict_scalar(value: Any, kinds: set[type], where: str = "") -> Any:
    """No ``true`` for a count, no ``2.5`` or ``"4"`` for a count, no ``1`` for a switch, only finite numbers.

    A number field also takes a numeric string: PyYAML reads ``1e-3`` (no dot) as the string "1e-3".
    """
    if kinds == {bool}:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false{where}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a {'number' if float in kinds else 'whole number'}, not true or false{where}")
    if float in kinds:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError(f"expected a number{where}") from None
        elif not isinstance(value, int | float):
            raise ValueError(f"expected a number{where}")
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number{where}")
        return number
    if not isinstance(value, int):
        raise ValueError(f"expected a whole number{where}")
    return value
