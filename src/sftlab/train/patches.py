"""Every process-wide patch sftlab makes, applied and undone by one context manager: `applied(model, perf)`.

The training loop holds it for the length of a fit, and `evaluate` for an evaluation; outside it, the process
sees torch, transformers and glibc exactly as they were. Each patch is a speed lever of `perf:` (same loss and
gradients as without it, tested) and lives in its own module:

| patch                    | what it replaces, while held                                        | module          |
|--------------------------|---------------------------------------------------------------------|-----------------|
| malloc mode              | glibc's mmap/trim thresholds (retain freed activations, or return    | train/memory.py |
|                          | them: `malloc_retain`, `malloc_mmap_threshold`)                     |                 |
| varlen attention         | transformers' "sdpa" attention-registry entry, wrapped to take      | train/varlen.py |
|                          | per-example segments on packed rows (`varlen_attention`)            |                 |
| fused RoPE               | the modeling modules' global `apply_rotary_pos_emb` (`fused_rope`)  | train/rope.py   |
| oneDNN GEMMs             | sftlab.gemm's process-wide switch, and the `forward` of the model's | gemm.py         |
|                          | plain nn.Linear instances (`onednn_gemm`)                           |                 |

Per-forward hooks that touch only this model's modules for one call (the last MLP's trim, `train/tail.py`) are
not process-wide and stay inside the objective's forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .. import gemm
from ..config import PerfConfig
from . import memory, rope, tail, varlen


@contextlib.contextmanager
def applied(model: nn.Module, perf: PerfConfig, malloc: bool = True) -> Iterator[None]:
    """Apply the patches `perf` asks for (see the table above); restore every one on exit, error or not.

    malloc=False leaves the allocator alone (a short evaluation outside training need not retune it).
    """
    with contextlib.ExitStack() as stack:
        if malloc:
            stack.enter_context(memory.malloc_mode(perf.malloc_mmap_threshold, perf.malloc_retain))
        if perf.varlen_attention:
            stack.enter_context(varlen.registered())
        body = getattr(model, "base_model", model)
        # activation checkpointing recomputes blocks outside any forward-time swap: keep transformers' RoPE there
        if perf.fused_rope and not tail.checkpointed(body):
            stack.enter_context(rope.fused_rope(body))
        stack.enter_context(gemm.enabled(perf.onednn_gemm))
        stack.enter_context(gemm.linears(model, perf.onednn_gemm))
        yield
