"""The base of every config section (run config and method configs alike): strict, validated pydantic models.

It sits at the bottom of the import graph so that `config` and `methods` both build on it without importing
each other's internals.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _kinds(annotation: Any) -> set[type]:
    """The plain types a field accepts: `bool | None` -> {bool, NoneType}."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {a for a in typing.get_args(annotation) if isinstance(a, type)}
    return {annotation} if isinstance(annotation, type) else set()


class StrictModel(BaseModel):
    """Unknown keys are errors, fields are validated on assignment, numbers must be finite, and a bool field takes
    only true/false: pydantic would read 'yes', 'true', 1 or 'on' as True (a quoted `trust_remote_code: 'yes'`
    silently turning remote code on), and a number field would read true as 1."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_bools(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        kinds = _kinds(field.annotation) if field is not None else set()
        if bool in kinds and not isinstance(v, bool) and not (v is None and type(None) in kinds):
            raise ValueError(
                "must be true, false or null" if type(None) in kinds else "must be true or false"
            )
        if isinstance(v, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError("must be a number, not true/false")
        return v
