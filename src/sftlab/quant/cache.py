"""Decode each quantised weight once for inference, not once per forward.

A QuantLinear decodes its weight in every forward (linear.py): right for training, where no full-precision copy may
outlive a GEMM, but generation runs a forward per new token, so every weight was decoded once per token (~0.6 s a
token for SmolLM2-135M NF4 on CPU). Inside `decoded_once(model)`, a layer in eval mode (generation, loss eval,
classification) keeps its decoded weight and reuses it; a layer in training mode decodes per use as before, and
`model.train()` frees the weights it kept. Leaving the block frees every kept weight, so training resumes with the
memory it had. The kept weight is the one a fresh decode gives (decoding is deterministic): outputs do not change.

The decoded weights together take what the full-precision linears would (4 bytes a weight in fp32). `max_bytes`
bounds that (default: half the memory free now on the layers' device, so a base quantised to fit is not pushed out
of memory by its own cache); layers beyond it decode per use as before. The cache holds the weights as the GEMM
reads them; nothing else sees them (`QuantLinear.weight` still decodes a fresh copy).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from .linear import QuantLinear


class DecodedWeights:
    """The weights decoded inside one `decoded_once` block, up to `left` more bytes (None: no bound)."""

    def __init__(self, left: int | None):
        self.left = left
        self.store: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
        """The layer's weight in `dtype`: kept from an earlier forward, or decoded now (and kept while it fits)."""
        key = (id(layer), dtype)
        w = self.store.get(key)
        if w is not None and w.device == layer.q_codes.device:
            return w
        self._forget(key)  # moved to another device since: decode again
        w = layer.decoded(dtype)
        size = w.numel() * w.element_size()
        if self.left is None or size <= self.left:
            self.store[key] = w
            self.left = None if self.left is None else self.left - size
        return w

    def drop(self, layer: QuantLinear) -> None:
        """Free the layer's decoded weights (it trains again)."""
        for key in [k for k in self.store if k[0] == id(layer)]:
            self._forget(key)

    def _forget(self, key: tuple[int, torch.dtype]) -> None:
        w = self.store.pop(key, None)
        if w is not None and self.left is not None:
            self.left += w.numel() * w.element_size()


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` now (CUDA: the driver's count; CPU: /proc/meminfo MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def decoded_once(model: nn.Module, max_bytes: int | Literal["auto"] | None = "auto") -> Iterator[int]:
    """Within the block, the model's QuantLinear layers in eval mode decode their weight once (per dtype) and reuse
    it; yields how many layers take part. `max_bytes`: the most the kept weights may take (None: no bound; auto:
    half the free memory). Nested blocks share the outer one's cache. Leaving the block frees every kept weight."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.decode_cache is None]
    if not layers:
        yield 0
        return
    if max_bytes == "auto":
        free = free_bytes(layers[0].q_codes.device)
        max_bytes = None if free is None else free // 2
    cache = DecodedWeights(max_bytes)
    for m in layers:
        m.decode_cache = cache
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.decode_cache = None
        cache.store.clear()
