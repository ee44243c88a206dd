"""Activation memory of one training pass: the bytes autograd keeps for backward, per block, per family.

Derived by walking each family's block as HF writes it (and sftlab runs it: packed rows with per-example
attention, the fused LM head, the last MLP on supervised positions only) and listing every tensor an op saves
for its backward. Checked against autograd itself: a test counts the storages that
`torch.autograd.graph.saved_tensors_hooks` sees on real tiny models of the four families under every method.
Per token of a block through which a gradient flows (E = bytes per element of the model dtype, s = the length
attention spans, a = heads, q = heads x head_dim, kv = kv heads x head_dim, f = MLP width, M = bytes of a dropout
mask element: E on CPU, where dropout keeps a scaled float mask, 1 on CUDA):

  Llama (pre-RMSNorm, SiLU-gated MLP, RoPE, no dropout), per norm: x in fp32 (4h) + 1/rms (4);
    + E*h (the normalised x) when the norm weight trains; + E*h (its weighted output) when the next linear keeps
    its input. Attention (sdpa, flash-style: no a*s term): E*(q + 2kv) (q, k after RoPE, v) + E*q (output) + 4a
    (logsumexp). MLP: 3*E*f (SiLU input, its output, the up projection), + E*f when down_proj keeps its input.
  GPT-2 (pre-LayerNorm, fused qkv, gelu_new, dropout): per LayerNorm E*h + 8; attention keeps the c_attn output
    (3 E h); on CPU with attention dropout sdpa takes the math path: + 2*E*q (scaled q, k) + (2E + M)*a*s
    (softmax, dropout mask, dropped probabilities); gelu_new keeps 4*E*f; a dropout mask M*h after attention
    and after the MLP.
  BERT (post-LayerNorm, erf GELU): attention as GPT-2's math path with separate q/k/v copies (3 E q); GELU keeps
    E*f; LayerNorm E*h + 8; dropout masks M*h twice.
  T5 (pre-RMSNorm, relative bias, ReLU or gated-gelu): attention like BERT's; ReLU keeps E*f and a dropout mask
    M*f inside the MLP; the decoder adds cross-attention over the source (its k, v and a*S terms scale with the
    source length S per target token).
  Every family: + E*q for the attention output projection's input and E*h (E*f) for the MLP's first (last)
    projection when those keep their inputs; + E*r per LoRA-adapted linear (x A^T), + E*d_out per DoRA linear;
    + E*h + E*m (ReLU, 2*E*m otherwise) per bottleneck adapter point.

A block below every trainable parameter keeps nothing (no gradient flows there). With activation checkpointing
each block keeps only its input (E*h per token) and one block's full set is live again during its recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Shape
from .structure import ENTRY, BlockTraining

FP32 = 4


@dataclass(frozen=True)
class Pass:
    """The largest forward/backward pass of a step, as sftlab batches it."""

    tokens: int  # real tokens (plus virtual ones for prompt tuning)
    span: int  # positions one attention call spans (an example's length: packed rows attend per example)
    supervised_share: float  # positions the loss reads (the LM head and the trimmed last MLP run there)
    source_tokens: int = 0  # seq2seq: encoder tokens (tokens then counts decoder tokens)
    source_span: int = 0
    prefix: int = 0  # prefix tuning: virtual keys/values per attention call
    trim_last_mlp: bool = True


@dataclass(frozen=True)
class Bytes:
    """Per-element sizes: the model dtype, and a dropout mask element on this device."""

    e: int  # 4 fp32, 2 bf16/fp16
    mask: int  # e on CPU, 1 on CUDA
    math_attention: bool  # sdpa's math path (CPU with attention dropout): keeps a*s probabilities


def _norm(shape: Shape, b: BlockTraining, by: Bytes) -> float:
    """A norm's own saved tensors (its output, kept by the next linear, is counted there)."""
    h, e = shape.hidden, by.e
    if shape.family in ("gpt2", "bert"):  # native layer_norm: input, mean, rstd
        return e * h + 2 * FP32
    # RMSNorm (Llama, T5): x in fp32 and 1/rms; the normalised x when the weight trains
    return FP32 * h + FP32 + (e * h if b.norm_trains else 0)


def _attention(shape: Shape, span: int, by: Bytes, prefix: int = 0, kv_len: int | None = None) -> float:
    """Per query token: what sdpa and the projections feeding it keep. kv_len: keys per query when they are not
    the query's own span (cross-attention: the source length); prefix: virtual keys in front."""
    e, h, q, kv, a = by.e, shape.hidden, shape.q, shape.kv, shape.heads
    keys = (kv_len if kv_len is not None else span) + prefix
    ratio = keys / max(1, span)
    fused = shape.family == "gpt2"  # q, k, v are views of the one c_attn output
    if by.math_attention and shape.attn_dropout:  # sdpa's math path: probabilities, mask, dropped ones
        kept = 3 * e * h + 2 * e * q if fused else e * q + 2 * e * q * ratio
        return kept + (2 * e + by.mask) * a * keys
    if prefix:  # the prefix seam: keys/values with the prefix, expanded to every query head
        return 2 * e * q + 2 * e * q * ratio + FP32 * a
    return (3 * e * h if fused else e * (q + 2 * kv * ratio)) + e * q + FP32 * a


def _mlp_act(shape: Shape, by: Bytes) -> float:
    """What the MLP's activation keeps between its two projections."""
    e, f = by.e, shape.ffn
    if shape.family == "llama":
        return 3 * e * f  # SiLU's input, its output and the up projection (the gate's product)
    if shape.family == "gpt2":
        return 4 * e * f  # gelu_new, written out in Python: x, x^3 term, tanh, 1 + tanh
    if shape.family == "bert":
        return e * f  # erf GELU keeps its input
    # T5: the ReLU output (gated-gelu: gelu_new's four, the linear branch, the product)
    act = 6 * e * f if shape.gated else e * f
    return act + (by.mask * f if shape.dropout else 0)  # T5's dropout inside the MLP


def _method_extras(shape: Shape, b: BlockTraining, by: Bytes) -> float:
    e = by.e
    extra = e * b.lora_ranks + e * b.dora_width  # DoRA keeps scale·(...)'s (tokens x d_out) input
    for m in b.adapters:
        extra += e * shape.hidden + e * m
    return extra


def block_bytes_per_token(
    shape: Shape, b: BlockTraining, p: Pass, by: Bytes, mlp_share: float = 1.0
) -> float:
    """Bytes one token leaves in block `b` for backward. mlp_share < 1: the MLP ran on that share of positions
    (sftlab's trimmed last MLP: its input is gathered there and its output scattered back). A linear that trains
    (or carries LoRA) keeps its input wherever it is; the other tensors are kept only past the point where the
    gradient enters the block (`b.entry`)."""
    if not b.grads:
        return 0.0
    h, e, q = shape.hidden, by.e, shape.q
    after = ENTRY.index(b.entry)
    flows = lambda point: after <= ENTRY.index(point)  # noqa: E731  a gradient reaches this point's input
    kept = lambda role, size: e * size if role in b.saves else 0  # noqa: E731  a linear's input
    drop = by.mask * h if shape.dropout else 0
    norm = _norm(shape, b, by)
    attn = kept("qkv", h) + (_attention(shape, p.span, by, p.prefix) if flows("qkv") else 0) + kept("o", q)
    attn += drop if flows("o") else 0
    mlp = kept("up", h) + (_mlp_act(shape, by) if flows("up") else 0) + kept("down", shape.ffn)
    mlp += drop if flows("down") else 0
    extras = _method_extras(shape, b, by)
    if shape.family == "bert":  # post-LN: x -> attention -> LN -> MLP -> LN
        return attn + (norm if flows("o") else 0) + mlp * mlp_share + (norm if flows("down") else 0) + extras
    total = (norm if flows("in") else 0) + attn
    if shape.family == "t5" and b.stack.startswith("decoder"):  # cross-attention over the source
        total += norm + kept("xq", h) + kept("xo", q) + drop
        total += _attention(shape, p.span, by, 0, kv_len=p.source_span)
    total += (norm if flows("o") else 0) + mlp * mlp_share
    if mlp_share < 1:
        total += e * h * mlp_share  # the scatter back to every position
    return total + extras


def pass_activation_bytes(
    shape: Shape,
    blocks: list[BlockTraining],
    p: Pass,
    by: Bytes,
    task: str,
    checkpointing: bool = False,
) -> float:
    """Bytes kept for backward over one pass (the blocks, the final norm and the loss), at its peak."""
    h, e = shape.hidden, by.e
    enc = [b for b in blocks if not b.stack.startswith("decoder")]
    dec = [b for b in blocks if b.stack.startswith("decoder")]
    if shape.family != "t5":
        enc, dec = blocks, []
    any_grad = any(b.grads for b in blocks)
    tokens_enc = p.source_tokens if dec else p.tokens
    trim = p.trim_last_mlp and task == "causal-lm" and not checkpointing
    last = enc[-1] if enc else None

    def stack_bytes(stack: list[BlockTraining], tokens: int, pas: Pass) -> float:
        if not stack:
            return 0.0
        per = [block_bytes_per_token(shape, b, pas, by) for b in stack]
        if checkpointing:  # each block keeps its input; the block being recomputed holds its full set
            return tokens * (sum(e * h for b in stack if b.grads) + max(per))
        total = tokens * sum(per)
        if trim and stack[-1] is last:  # the last MLP ran on the supervised positions only
            full = per[-1]
            part = block_bytes_per_token(shape, last, pas, by, mlp_share=pas.supervised_share)
            total -= tokens * (full - part)
        return total

    src = Pass(tokens_enc, p.source_span or p.span, p.supervised_share, prefix=p.prefix)
    total = stack_bytes(enc, tokens_enc, src if dec else p)
    total += stack_bytes(dec, p.tokens, p)
    if not any_grad:
        return total
    # after the blocks: the final norm, and the loss
    final = FP32 * h + FP32 if shape.family in ("llama", "t5") else e * h + 2 * FP32
    if dec:
        total += tokens_enc * final
    if task == "causal-lm":
        total += p.tokens * (final + e * h * p.supervised_share)  # + the fused head's dL/dh rows
    elif task == "seq2seq":  # the logits' log-softmax, twice: the HF model scores `labels=` itself, and so
        total += p.tokens * (
            final + 2 * FP32 * shape.vocab
        )  # does the objective (seq-cls: one row per example)
    return total
