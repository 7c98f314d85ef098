"""The base of every configuration model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A configuration model: unknown keys refused, values never coerced, instances immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
