"""The `perf:` section: speed and memory levers that never change what is learned."""

from __future__ import annotations

from pydantic import Field

from ..strict import StrictModel


class PerfConfig(StrictModel):
    """Speed and memory levers. Each gives the same loss and gradients as the plain path (a test checks it), so
    none changes what is learned; measurements are in benchmarks/README.md. Defaults are the fast settings."""

    loss_chunk_size: int = Field(
        512,
        gt=0,
        description="Supervised positions per LM-head chunk: bigger chunks run the head GEMM faster and hold a bigger "
        "(chunk x vocab) fp32 logits buffer.",
    )
    packing: bool | None = Field(
        None,
        description="Padding-free batches for causal-lm: a micro-batch's examples in one row, positions restarting per "
        "example. null (auto): on when a quick check shows the model keeps packed examples apart (it does not with "
        "prompt/prefix methods); true: require it; false: padded batches.",
    )
    micro_batch_tokens: int | None = Field(
        1024,
        gt=0,
        description="Memory cap: a micro-batch over this many tokens runs as several passes accumulated into the same "
        "step (same gradient, activations bounded by the cap). null: one pass per micro-batch.",
    )
    malloc_mmap_threshold: int | None = Field(
        None,
        gt=0,
        description="Low-memory mode (Linux/glibc, while training): blocks of at least this many bytes (e.g. 262144) "
        "get their own mmap, so freed activations go back to the OS; lower peak RSS, slower steps. null: off.",
    )
    malloc_retain: bool = Field(
        True,
        description="Linux/glibc, while training: freed activations stay mapped for the next step instead of being "
        "returned and page-faulted back in. Ignored when malloc_mmap_threshold is set.",
    )
    varlen_attention: bool = Field(
        True, description="Packed rows: sdpa per example instead of one masked product over the whole row."
    )
    fused_loss: bool = Field(
        True,
        description="Fused LM head + cross-entropy (gradients in the forward pass); false: checkpointed chunks.",
    )
    trim_last_mlp: bool = Field(
        True, description="Causal LMs: the last block's MLP runs only on positions the loss reads."
    )
    fused_optimizer: bool = Field(
        True,
        description="torch's fused AdamW kernel where the parameters allow (same update, no temporaries).",
    )
    fused_rope: bool = Field(
        True,
        description="Causal LMs: rotary embeddings as one autograd node per tensor, where a probe shows the same values.",
    )
    onednn_gemm: bool = Field(
        True,
        description="CPU fp32: the big GEMMs through oneDNN instead of MKL where torch runs AVX-512 kernels and "
        "oneDNN passes an exactness probe.",
    )


PERF_KEYS = tuple(PerfConfig.model_fields)
