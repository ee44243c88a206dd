"""The bottleneck adapter's run config and its parameter count."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .._base import MethodConfigBase

DEFAULT_REDUCTION = 16.0


class AdapterConfig(MethodConfigBase):
    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and FFN outputs; pfeiffer: after FFN outputs only."
    )
    reduction_factor: float | None = Field(None, gt=0, description="Bottleneck = hidden / this (default 16).")
    bottleneck_size: int | None = Field(
        None, ge=1, description="Bottleneck width; overrides reduction_factor."
    )
    activation: Literal["relu", "gelu", "silu"] = Field(
        "relu", description="Non-linearity in the bottleneck."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after the activation (training only).")
    init: Literal["zero-up"] = Field("zero-up", description="W_up = 0: the model equals the base at step 0.")
    layer_norm: bool = Field(False, description="A LayerNorm on the adapter input (2·hidden more params).")
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained and saved whole with the adapter (name suffixes, e.g. 'classifier'); "
        "default: the fresh task head for seq-cls, nothing otherwise.",
    )

    @model_validator(mode="after")
    def _one_size(self):
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("method: set reduction_factor or bottleneck_size, not both")
        return self

    def bottleneck(self, hidden: int) -> int:
        rf = self.reduction_factor or DEFAULT_REDUCTION
        return self.bottleneck_size or max(1, round(hidden / rf))


def adapter_param_count(hidden: int, bottleneck: int, n_points: int, layer_norm: bool = False) -> int:
    """Trainable parameters of one adapter: per point (d·m + m) + (m·d + d) (+ 2d), times points."""
    d, m = hidden, bottleneck
    return n_points * ((d * m + m) + (m * d + d) + (2 * d if layer_norm else 0))
