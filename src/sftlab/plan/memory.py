"""The memory side of a plan: the parts of a training process's peak, how they add up, and the fitted CPU terms.

`plan/estimate.py` fills a `Memory` per candidate (its module docstring says what each part counts); this module
owns how the parts make a peak (one device, or FSDP over several), the allocator and runtime constants fitted on
measured peaks, and the byte counts that depend on dtypes: parameters at their own dtype, autocast's weight copies,
a quantised base's codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant import quantizable
from .candidates import Candidate
from .model import ModelSource, meta_model
from .structure import BlockTraining

# Resident memory beyond the live tensors, as a share of the activations: a step frees and re-allocates its
# activations and backward temporaries in sizes that do not refill the same holes, so the heap grows past its live
# peak. Fitted with RUNTIME on glibc, on two models' measured peaks (`sftlab plan --measure`, batch 8 x 128 tokens,
# every method): the 21M-parameter Llama of examples/plan/llama-21m (4 blocks) and SmolLM2-135M (30 blocks). A share
# alone does not fit both (0.4-1.3 on the first, 0.12-0.46 on the second: the heap's growth is partly a fixed cost);
# share + constant does: 0.26 and 70 MB put all 21 rows within 11%. The CUDA caching allocator is not measured
# here (0: its reserve is not modelled).
ALLOCATOR_SHARE = {"cpu": 0.26, "cuda": 0.0}
# ... and more when a step takes several passes (`micro_batch_tokens` cuts the batch): each pass frees its activations
# and the next builds its own while the earlier passes' gradients are live, and the heap grows further. Fitted on the
# 21M model at two passes a step (256-token examples, every method): +0.1 to +0.4 x activations past the one-pass
# share, median +0.2 (DoRA +0.4, the most).
ALLOCATOR_SHARE_ACCUMULATING = {"cpu": 0.2, "cuda": 0.0}
# Resident memory of a training process beyond the model and the pass: the modeling code and kernels loaded when the
# model is built, collated batches, the packing probe, RoPE tables, optimizer bookkeeping. CPU: fitted with
# ALLOCATOR_SHARE above (70 MB; malloc's in-use peak minus the parts was ~20 MB on the 21M model, the rest is code
# and library state that comes in with the model). CUDA: the context and cuBLAS workspaces take about 0.5 GB of
# device memory (assumed).
RUNTIME = {"cpu": 70e6, "cuda": 0.5e9}


@dataclass
class Memory:
    """Bytes by part, and the peak they make (see the module docstring)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_ckpt: float
    workspace: float
    head_gradient: float = 0.0  # the fused LM head's fp32 weight gradient, built during the forward pass
    accumulates: bool = False  # several passes per step: the gradients of the earlier ones stay live
    allocator_share: float = 0.0  # heap growth beyond live tensors, as a share of the activations
    runtime: float = 0.0  # the training process's own state (RUNTIME)
    casts: float = 0.0  # autocast's half-precision weight copies kept for backward (mixed precision)
    shards: int = 1  # FSDP: devices the weights, gradients and optimizer state are sharded over
    unit: float = 0.0  # FSDP: the largest block's weights, gathered whole while it runs
    replicated: float = (
        0.0  # FSDP: weights it does not shard (a quantised base's codes are buffers, not parameters)
    )

    def _peak(self, act: float, shards: int = 1) -> float:
        gathered = 2 * self.unit if shards > 1 else 0.0  # this block's and the prefetched next one's
        during_forward = act + self.workspace + self.head_gradient + self.casts / shards + gathered
        grads = self.gradients / shards
        live = grads + during_forward if self.accumulates else max(during_forward, grads)
        states = (self.weights - self.replicated + self.optimizer) / shards + self.replicated
        return states + live + self.allocator_share * act + self.runtime

    @property
    def peak(self) -> float:
        return self._peak(self.activations)

    @property
    def peak_ckpt(self) -> float:
        return self._peak(self.activations_ckpt)

    @property
    def peak_sharded(self) -> float | None:
        """Per device under FSDP over `shards` devices (None on one device)."""
        return self._peak(self.activations, self.shards) if self.shards > 1 else None

    @property
    def peak_sharded_ckpt(self) -> float | None:
        return self._peak(self.activations_ckpt, self.shards) if self.shards > 1 else None


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every parameter, bytes of the trainable ones), each at its own dtype."""
    every = trainable = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        every += n
        trainable += n if p.requires_grad else 0
    return every, trainable


def autocast_copies(blocks: list[BlockTraining], mixed: bool, e: int, quantized: bool) -> float:
    """Bytes of autocast's half-precision weight copies live at the end of the forward: every base matmul weight
    whose input a gradient reaches (backward needs the weight for that input's gradient) and every trainable
    matmul weight (autocast caches its casts of trainable leaves), the method's own included. The LM head is
    not among them: sftlab's fused head casts it chunk by chunk and keeps none. None when the weights are already
    in half precision (nothing to cast), or decoded per use from a quantised base."""
    if not mixed or e <= 2:
        return 0.0
    base = 0 if quantized else sum(b.matmul_past_entry for b in blocks)
    return 2.0 * (base + sum(b.added for b in blocks))


def allocator_share(device_kind: str, accumulating: bool) -> float:
    """The heap's growth past the live tensors, as a share of the activations (the constants above)."""
    extra = ALLOCATOR_SHARE_ACCUMULATING.get(device_kind, 0.0) if accumulating else 0.0
    return ALLOCATOR_SHARE.get(device_kind, 0.0) + extra


# Bytes a weight takes in a quantised base: NF4 codes + int8 block scales (+ fp32 factor per 256 scales) | int8 + a
# per-row scale (ignored). See quant/codecs.py.
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


def quantized_weights(source: ModelSource, dtype: torch.dtype, cand: Candidate) -> tuple[int, float]:
    """(weights a quantised base (cand.extra["quantize"]) holds as codes, bytes per such weight): the layers sftlab
    quantises, every linear but the heads; (0, 0.0) for other candidates."""
    kind = cand.extra.get("quantize")
    if not kind:
        return 0, 0.0
    base = meta_model(source, dtype)
    return sum(base.get_submodule(p).weight.numel() for p in quantizable(base)), QUANT_BYTES[kind]
