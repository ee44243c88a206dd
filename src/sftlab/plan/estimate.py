"""The numbers of one candidate: parameters, peak memory by part, FLOPs per token, time, storage, inference cost.

Parameters are counted on the meta model after the method's own apply() (plan/model.py), so they are exact.
How the memory parts make a peak, and the fitted CPU allocator terms, are plan/memory.py's.
Memory, for the largest pass of a step as sftlab batches it (`micro_batch_tokens` cuts a batch into passes):

  weights     every parameter (base + the method's) x its bytes (the model dtype; the methods' own parameters
              are fp32 whatever the base's dtype)
  gradients   each trainable parameter x its bytes (gradients follow the parameters' dtype)
  optimizer   AdamW's two moments, 2 x the same (torch's fused AdamW, states in the parameters' dtype)
  activations what autograd keeps for backward over the pass (plan/activations.py), without and with
              activation checkpointing (under bf16-/fp16-mixed over fp32 weights still at 4 bytes an element:
              an upper bound, see `estimate`)
  casts       bf16-/fp16-mixed over fp32 weights: autocast's half-precision copy of every matmul weight a
              gradient flows through (the copy is kept for backward), and of the LM head: 2 bytes a weight
  workspace   the fused LM head's fp32 logits chunk (min(loss_chunk_size, supervised rows) x vocab x 4) and the
              transient gradients of backward (two (tokens x MLP width) tensors)
  peak        the sum: every part can be live at once (the first step of each pass of a later step holds the
              previous step's optimizer state while its activations build up)

FLOPs per token, counted as torch's FlopCounterMode counts them (a matmul of n x k by k x m is 2nkm; attention
as the dense product over each example): forward 2N + 4·q·s per block (N: the matmul weights the token passes
through, s: the keys it attends to), the LM head on supervised positions only (sftlab's fused head) and the last
block's MLP likewise. Training adds backward: 2N for the input gradients of every block a gradient flows through,
2N for every weight that trains, twice the attention forward: about 6N for full fine-tuning and 4N for a frozen
base with a small trainable part.

Time: on this machine's CPU, the step's work split by kind (`step_work`) at the rates plan/timing.py measures now
(under autocast for the mixed precisions); elsewhere (a stated device, `--throughput`) the FLOPs per token at the
device's throughput.

Several devices (`--device cuda:80GBx8`): data-parallel, as `sftlab train --nproc N` runs (train/distributed.py).
DDP keeps everything above on every device; FSDP (`train.distributed: fsdp`) shards weights, gradients and
optimizer state N ways and gathers one block's weights at a time (two with prefetch), so `peak_sharded` is that
per-device peak. Time per epoch divides by N (communication not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config import PerfConfig, RunConfig
from ..methods import get_method
from ..methods._targets import count_parameters
from ..models import DTYPES
from .activations import Bytes, Pass, block_bytes_per_token, pass_activation_bytes
from .candidates import Candidate
from .device import Device, Throughput
from .memory import RUNTIME, Memory, allocator_share, autocast_copies, parameter_bytes, quantized_weights
from .model import ModelSource, Shape, meta_model, shape_of, with_method
from .structure import BlockTraining, head_matmul, outside_matmul, read_blocks
from .timing import Rates, Work, step_seconds
from .workload import Workload


@dataclass(frozen=True)
class Settings:
    """How training would run: the knobs of `train:` and `perf:` that change memory and time."""

    batch_size: int = 8
    dtype: str = "float32"
    micro_batch_tokens: int | None = PerfConfig().micro_batch_tokens
    loss_chunk_size: int = PerfConfig().loss_chunk_size
    epochs: float = 1.0
    precision: str = "fp32"  # train.precision: fp32 | bf16-mixed | fp16-mixed
    processes: int = 1  # data-parallel processes (devices)

    @property
    def mixed(self) -> bool:
        return self.precision.endswith("-mixed")


@dataclass
class Estimate:
    candidate: Candidate
    trainable: int = 0
    total: int = 0
    base_total: int = 0
    memory: Memory | None = None
    pass_tokens: int = 0
    flops_forward: float = 0.0  # per real token
    flops_train: float = 0.0  # per real token, forward + backward
    tokens_per_epoch: float = 0.0
    tokens_per_s: float | None = None  # training: the calibrated time model (CPU), or FLOPs / throughput
    time_model: str = ""  # which of the two
    time_per_epoch_s: float | None = None
    storage_bytes: float = 0.0  # what one task's run saves in final/
    inference_extra: float = 0.0  # extra FLOPs per token at inference, as trained
    inference_extra_merged: float | None = None  # ... after `sftlab merge` (None: the method cannot merge)
    fits: bool | None = None
    fits_ckpt: bool | None = None
    fits_sharded: bool | None = None  # FSDP over the devices (None on one device)
    fits_sharded_ckpt: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.candidate.key


def method_config(cand: Candidate):
    return get_method(cand.method["name"]).config(**cand.method)


def largest_pass(w: Workload, s: Settings, cand: Candidate) -> tuple[int, int]:
    """(examples, tokens per example) of a step's largest pass: a batch of the longest examples, cut by
    micro_batch_tokens into as few, as even passes as sftlab's `balanced_parts` makes."""
    length = w.max_tokens
    cost = length  # the batcher counts real tokens (virtual ones are not in the examples)
    per_pass = s.batch_size
    if s.micro_batch_tokens:
        fit = max(1, s.micro_batch_tokens // cost)
        parts = -(-s.batch_size // fit)
        per_pass = -(-s.batch_size // parts)
    return per_pass, length + cand.virtual_tokens


def passes_per_step(w: Workload, s: Settings) -> int:
    if not s.micro_batch_tokens:
        return 1
    fit = max(1, s.micro_batch_tokens // w.max_tokens)
    return -(-s.batch_size // fit)


def _pass(w: Workload, s: Settings, task: str, cand: Candidate) -> Pass:
    rows, length = largest_pass(w, s, cand)
    if task == "seq2seq":
        return Pass(rows * w.target_max, w.target_max, 1.0, rows * length, length, cand.prefix_tokens)
    return Pass(
        rows * length,
        length,
        w.supervised_share,
        prefix=cand.prefix_tokens,
        trim_last_mlp=not cand.virtual_tokens,
    )


def block_flops(
    shape: Shape, b: BlockTraining, n: float, keys: float, mlp_share: float, source: float = 0
) -> tuple[float, float]:
    """(forward, backward) FLOPs of block b over n tokens attending to `keys` keys; `source`: a T5 decoder block's
    source length (its cross-attention reads that many keys, projected once per source token)."""
    w = block_work(shape, b, n, keys, mlp_share, source)
    fwd = w["gemm_fwd"] + w["thin_fwd"] + w["attn_fwd"]
    return fwd, w["gemm"] + w["wgrad"] + w["thin"] + w["attention"] - fwd


def block_work(
    shape: Shape, b: BlockTraining, n: float, keys: float, mlp_share: float, source: float = 0
) -> dict[str, float]:
    """Block b's FLOPs by kind of work (plan/timing.py), forward + backward: base GEMMs (forward 2N, input
    gradients 2N where a gradient flows), weight gradients (2N of the weights that train), the method's thin
    products (LoRA A/B, adapter down/up: 2 forward, 4 backward per weight), attention (4·q·s forward, twice that
    backward); `*_fwd`: the forward share."""
    mm = (
        (b.matmul - b.matmul_mlp - b.matmul_source) * n
        + b.matmul_mlp * mlp_share * n
        + b.matmul_source * source
    )
    trains = (b.matmul_trains - b.matmul_source_trains) * n + b.matmul_source_trains * source
    attn = 4 * shape.q * n * (keys + source)
    back = 1 if b.grads else 0
    return {
        "gemm_fwd": 2 * mm,
        "thin_fwd": 2 * b.added * n,
        "attn_fwd": attn,
        "gemm": 2 * mm * (1 + back),
        "wgrad": 2 * trains * back,
        "thin": 2 * b.added * n * (1 + 2 * back),
        "attention": attn * (1 + 2 * back),
    }


def example_flops(
    shape: Shape,
    blocks: list[BlockTraining],
    head: tuple[int, bool],
    other: int,
    task: str,
    length: float,
    target: float,
    share: float,
    cand: Candidate,
    trim: bool = True,
) -> tuple[float, float]:
    """(forward, training) FLOPs of one example of `length` tokens (seq2seq: `length` source + `target`)."""
    fwd = bwd = 0.0
    n = length + cand.virtual_tokens
    decoder = [b for b in blocks if b.stack.startswith("decoder")] if shape.family == "t5" else []
    last = blocks[-1] if blocks else None
    for b in blocks:
        if b in decoder:
            f, g = block_flops(shape, b, target, target + cand.prefix_tokens, 1.0, source=length)
        else:
            mlp_share = (
                share if (trim and task == "causal-lm" and b is last and not cand.virtual_tokens) else 1.0
            )
            f, g = block_flops(shape, b, n, n + cand.prefix_tokens, mlp_share)
        fwd, bwd = fwd + f, bwd + g
    head_w, head_trains = head
    rows = {"causal-lm": length * share, "seq2seq": target}.get(task, 0.0)
    fwd += 2 * head_w * rows + 2 * other
    if any(b.grads for b in blocks):
        bwd += 2 * head_w * rows
    if head_trains:
        bwd += 2 * head_w * rows
    return fwd, fwd + bwd


def thin_width(cand: Candidate, b: BlockTraining) -> int:
    """The inner width of the method's thin products in block b: LoRA's rank, an adapter's bottleneck."""
    return int(cand.method.get("r") or (b.adapters[0] if b.adapters else 0) or 1)


def step_work(
    shape: Shape,
    blocks: list[BlockTraining],
    head: tuple[int, bool],
    other: int,
    task: str,
    w: Workload,
    s: Settings,
    cand: Candidate,
    by: Bytes,
    trainable: int,
) -> Work:
    """What one optimizer step of `s.batch_size` mean-length examples does, by kind (plan/timing.py)."""
    work = Work(trainable=trainable)
    # sftlab packs a causal-lm batch into rows and runs attention per example (train/varlen.py), unmasked; prompt
    # tuning turns packing off (a padded batch, masked); prefix tuning packs but attends through a mask over the
    # whole row (its extra keys go through the cache path), so each query spans the row; other tasks are padded.
    work.masked_attention = bool(cand.virtual_tokens or cand.prefix_tokens) or task != "causal-lm"
    packed_prefix = task == "causal-lm" and bool(cand.prefix_tokens) and not cand.virtual_tokens
    length, target, share = w.mean_tokens, w.target_mean, w.supervised_share
    n = length + cand.virtual_tokens
    p = _pass(w, s, task, cand)
    decoder = [b for b in blocks if b.stack.startswith("decoder")] if shape.family == "t5" else []
    last = blocks[-1] if blocks else None
    for b in blocks:
        if b in decoder:
            parts = block_work(shape, b, target, target + cand.prefix_tokens, 1.0, source=length)
            tokens = target
        else:
            trim = task == "causal-lm" and b is last and not cand.virtual_tokens
            span = p.tokens if packed_prefix else n  # keys each query reads
            parts = block_work(shape, b, n, span + cand.prefix_tokens, share if trim else 1.0)
            tokens = n
        work.gemm += parts["gemm"]
        work.wgrad += parts["wgrad"]
        work.add_thin(thin_width(cand, b), parts["thin"])
        work.attention += parts["attention"]
        if b.grads:
            work.block_tokens_train += tokens
            # the method's own kept tensors (LoRA's x A, an adapter's bottleneck, DoRA's norms): written, read, and
            # their gradients written and read
            plain = replace(b, lora_ranks=0, dora_width=0, adapters=[])
            extra = block_bytes_per_token(shape, b, p, by) - block_bytes_per_token(shape, plain, p, by)
            work.elementwise_bytes += 4 * tokens * max(0.0, extra)
        else:
            work.block_tokens_forward += tokens
        # DoRA's row norms ||W + s·BA||, expanded (lora/layer.py `_weight_norm`): W A^T, a thin product over each
        # weight, and r x r ones (A A^T, B·(A A^T)); ||W_i||^2 is cached; a half-precision W is cast to fp32 in
        # chunks first (read, written). Never W + BA itself.
        if b.dora_width:
            r = thin_width(cand, b)
            work.add_thin(r, 3 * 2 * r * (b.matmul + r * b.dora_width) / s.batch_size)
            if by.e < 4:
                work.elementwise_bytes += 3 * (by.e + 4) * b.matmul / s.batch_size
    head_w, head_trains = head
    rows = {"causal-lm": length * share, "seq2seq": target}.get(task, 0.0)
    any_grad = any(b.grads for b in blocks)
    work.gemm += 2 * head_w * rows * (2 if any_grad else 1) + 2 * other
    work.wgrad += 2 * head_w * rows if head_trains else 0.0
    if task in ("causal-lm", "seq2seq"):  # the loss: logits written, softmax read and written, gradient read
        work.elementwise_bytes += 4 * rows * shape.vocab * 4
    k = s.batch_size
    work.gemm, work.wgrad, work.attention = k * work.gemm, k * work.wgrad, k * work.attention
    work.thin = {wd: k * fl for wd, fl in work.thin.items()}
    work.elementwise_bytes *= k
    work.block_tokens_train *= k
    work.block_tokens_forward *= k
    return work


def inference_extra(shape: Shape, blocks: list[BlockTraining], cand: Candidate) -> tuple[float, float | None]:
    """Extra FLOPs per token at inference over the base model: (as trained, after merging or None)."""
    added = sum(b.added for b in blocks)
    if cand.family == "reparameterized":
        return 2.0 * added, 0.0
    if cand.family == "additive":
        return 2.0 * added, None
    if cand.family == "soft-prompt":
        sites = len(blocks) + sum(
            1 for b in blocks if b.stack.startswith("decoder")
        )  # T5: cross-attention too
        m = cand.prefix_tokens or cand.virtual_tokens
        return 4.0 * shape.q * m * sites, None
    return 0.0, None


def estimate(
    source: ModelSource,
    cand: Candidate,
    w: Workload,
    s: Settings,
    device: Device,
    tput: Throughput,
    base_total: int | None = None,
    rates: Rates | None = None,
) -> Estimate:
    """Every number of `cand` for this model, workload, settings and device. Time: `rates` (this CPU's, measured
    by plan/timing.py) when given, else the FLOPs at the device's throughput."""
    est = Estimate(cand)
    if not cand.available:
        est.notes.append(cand.note)
        return est
    dtype = DTYPES[s.dtype]
    model = with_method(source, method_config(cand), dtype)
    shape = shape_of(source.config)
    est.trainable, est.total = count_parameters(model)
    est.base_total = base_total if base_total is not None else count_parameters(meta_model(source, dtype))[1]
    blocks = read_blocks(model, shape.family)
    head = head_matmul(model, source.task)
    e = torch.tensor([], dtype=dtype).element_size()
    # Activations at the model dtype's element size also under autocast over fp32 weights: it keeps a mix (the fp32
    # residual stream and norms, half-precision matmul inputs, sometimes both copies of one tensor), measured on the
    # four tiny families 0-45% below the fp32 count, so the fp32 count is an upper bound, on the safe side for fits.
    by = Bytes(e, e if device.kind == "cpu" else 1, device.kind == "cpu")
    p = _pass(w, s, source.task, cand)
    est.pass_tokens = p.tokens + p.source_tokens
    act = pass_activation_bytes(shape, blocks, p, by, source.task)
    act_ckpt = pass_activation_bytes(shape, blocks, p, by, source.task, checkpointing=True)
    workspace = 0.0
    if source.task == "causal-lm":
        rows = min(s.loss_chunk_size, max(1, round(p.tokens * p.supervised_share)))
        workspace += rows * shape.vocab * 4
    workspace += 2 * p.tokens * shape.ffn * e
    n_quant, quant_bytes = quantized_weights(source, dtype, cand)
    quantized_saving = n_quant * (e - quant_bytes)
    weight_bytes, trainable_bytes = parameter_bytes(model)
    est.memory = Memory(
        weight_bytes - quantized_saving,
        trainable_bytes,
        2 * trainable_bytes,
        act,
        act_ckpt,
        workspace,
        head_gradient=head[0] * 4 if head[1] and source.task == "causal-lm" else 0.0,
        accumulates=passes_per_step(w, s) > 1,
        allocator_share=allocator_share(device.kind, passes_per_step(w, s) > 1),
        runtime=RUNTIME.get(device.kind, 0.0),
        casts=autocast_copies(blocks, s.mixed, e, bool(n_quant)),
        shards=s.processes,
        unit=max((b.matmul for b in blocks), default=0) * e,
        replicated=n_quant * quant_bytes,
    )
    per_example = w.mean_tokens + w.target_mean
    fwd, train = example_flops(
        shape, blocks, head, outside_matmul(model, source.task), source.task, w.mean_tokens, w.target_mean,
        w.supervised_share, cand,
    )  # fmt: skip
    est.flops_forward, est.flops_train = fwd / per_example, train / per_example
    est.tokens_per_epoch = w.tokens
    if rates is not None:
        work = step_work(shape, blocks, head, outside_matmul(model, source.task), source.task, w, s, cand, by,
                         est.trainable)  # fmt: skip
        est.tokens_per_s = s.batch_size * per_example / step_seconds(work, rates)
        est.time_model = "calibrated"
    elif tput.flops > 0:
        est.tokens_per_s = tput.flops / est.flops_train
        est.time_model = "flops"
    if est.tokens_per_s:
        est.tokens_per_s *= s.processes  # data-parallel: each process its share of the batch
    if est.tokens_per_s:
        est.time_per_epoch_s = est.tokens_per_epoch * s.epochs / est.tokens_per_s
    saves_full = get_method(cand.method["name"]).saves_full_model
    est.storage_bytes = weight_bytes if saves_full else trainable_bytes
    est.inference_extra, est.inference_extra_merged = inference_extra(shape, blocks, cand)
    est.fits = est.memory.peak <= device.memory
    est.fits_ckpt = est.memory.peak_ckpt <= device.memory
    if s.processes > 1:
        est.fits_sharded = est.memory.peak_sharded <= device.memory
        est.fits_sharded_ckpt = est.memory.peak_sharded_ckpt <= device.memory
    if n_quant:
        est.notes.append(
            "NF4 base: weights counted at 4.13 bits; time leaves out decoding each weight per GEMM (measured ~15% "
            "of a LoRA step on CPU)"
        )
    if not shape.known:
        est.notes.append(f"model_type {shape.model_type!r} is sized as Llama-like (approximate)")
    return est


def run_config(source: ModelSource, cand: Candidate, s: Settings, data: dict, output_dir: str) -> RunConfig:
    """A runnable sftlab config for `cand` (data: the `data:` section)."""
    from ..config import build_config

    raw = {
        "model": {"name": source.name, "task": source.task, "dtype": s.dtype, **_quant_keys(cand)},
        "method": dict(cand.method),
        "data": data,
        "train": {
            "output_dir": output_dir,
            "batch_size": s.batch_size,
            "epochs": s.epochs,
            **({"precision": s.precision} if s.precision != "fp32" else {}),
        },
        "perf": {"micro_batch_tokens": s.micro_batch_tokens, "loss_chunk_size": s.loss_chunk_size},
    }
    return build_config(raw, "plan")


def _quant_keys(cand: Candidate) -> dict:
    return {"quantize": cand.extra["quantize"]} if cand.extra.get("quantize") else {}
