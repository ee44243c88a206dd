"""The base of every config section (run config and method configs alike): strict, validated pydantic models.

It sits at the bottom of the import graph so that `config` and `methods` both build on it without importing
each other's internals.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors, fields are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
