"""The bottleneck MLP, and the switch that adds one per adapter name to an insertion point's output."""

from __future__ import annotations

import torch
from torch import nn

from .._adapters import Switch, mix_rows
from .config import AdapterConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    """x (..., d) -> W_up · dropout(act(W_down · LN(x))) (..., d); the caller adds the residual."""

    def __init__(self, hidden: int, bottleneck: int, cfg: AdapterConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, dtype=dtype, device=device) if cfg.layer_norm else None
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)  # adapters may stay fp32 on a bf16 base
        if self.norm is not None:
            h = self.norm(h)
        return self.up(self.drop(self.act(self.down(h)))).to(x.dtype)


class AdapterSwitch(Switch):
    """Wraps one insertion point: y = base(x), then y + adapters[name](y) for the routed name (or per row).

    With no routed name (or one this point does not hold) the base module runs untouched."""

    table = "adapters"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()

    def __getattr__(self, name: str):
        # Model code reads e.g. `self.wo.weight.dtype` (T5) or `c_proj.nf` (GPT-2): answer from the base.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def unwrapped(self) -> nn.Module:
        return self.base_layer

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)  # (B, ..., d)
        if self.row_names is not None:
            ads = self.adapters
            return mix_rows(y, self.row_names, lambda n, idx: y[idx] + ads[n](y[idx]) if n in ads else None)
        name = self.current()
        return y if name is None else y + self.adapters[name](y)
