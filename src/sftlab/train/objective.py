"""The training objective as one module: body + head + loss behind a single `forward(batch)`.

Why one module: wrappers (DDP, FSDP, hooks) only see what runs inside a module's forward. The causal-LM loss
reads the backbone's hidden states and scores the LM head on supervised rows only (never a [tokens x vocab]
tensor), so it must call the body and the head itself; doing that inside `Objective.forward` keeps it wrappable.
Training and evaluation both call it, so they score exactly alike.

It returns *sums* and counts, not a mean: the loop normalises per supervised token across a whole accumulated
batch (DESIGN.md), and evaluation per token across the eval set. Every method keeps `model.base_model(...)`
aligned with `input_ids` (methods that prepend virtual tokens strip them from the output), so one causal path
serves all of them. The process-wide levers (varlen attention, fused RoPE, oneDNN GEMMs) are applied around it
by `train/patches.applied`; the per-forward ones (fused head + CE, the trimmed last MLP) are its own.

Multi-task batches carry `task_ids` (each row's task, or each token's in a packed row), which never reach the
model: they route each row through its task's own head and adapter (`methods/multitask.rows`), and in training
weight the loss: with per-task `loss_weights` the sum is sum(w_task * token loss) and the count stays the number of
targets, so the loop's step loss is that weighted sum over the supervised tokens; with all weights 1 the plain path
runs. Per-example weights (`example_weights`, from data.weight_field: self-training's pseudo-labelled rows) multiply
in the same way. Evaluation (the objective in eval mode) reports unweighted losses.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import PerfConfig
from ..data.batching import IGNORE
from ..methods import multitask
from . import tail, varlen
from .device import module_device, to_device
from .loss import linear_cross_entropy_sum

TASKS = ("causal-lm", "seq2seq", "seq-cls", "masked-lm")
_INPUTS = ("input_ids", "attention_mask", "position_ids")


class LossSums(NamedTuple):
    loss: torch.Tensor  # sum of per-target losses, fp32 scalar
    count: int  # supervised targets (tokens, or rows for seq-cls)
    correct: int | None = None  # seq-cls: rows whose argmax is the label


def count_supervised(batch: dict, task: str) -> int:
    """Supervised targets in a micro-batch, known before any forward (for per-token normalisation)."""
    labels = batch["labels"]
    if task == "causal-lm":
        return int((labels[:, 1:] != IGNORE).sum())
    if task in ("seq2seq", "masked-lm"):
        return int((labels != IGNORE).sum())
    return int(labels.numel())


def _head_ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    return F.cross_entropy(logits, y, reduction="sum")


def _fusable(head: nn.Module) -> bool:
    """Only a plain Linear head: a wrapped head (LoRA on lm_head, modules_to_save) runs its own forward."""
    return type(head) is nn.Linear


def _takes_kwargs(module: nn.Module) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values())


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in for `t`'s device, or None when autocast is off (train.precision fp32)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _packed_row(batch: dict) -> bool:
    return "position_ids" in batch and "attention_mask" not in batch and batch["input_ids"].shape[0] == 1


class Objective(nn.Module):
    """`forward(batch) -> LossSums` for a model of one task kind, with the speed levers of `perf`."""

    def __init__(
        self,
        model: nn.Module,
        task: str,
        perf: PerfConfig | None = None,
        loss_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        self.model = model
        self.task = task
        self.perf = perf or PerfConfig()
        # Multi-task: each target's loss times its task's weight (a batch's `task_ids` say whose it is). All 1 (or
        # none): the plain path, untouched. The count stays the number of targets, so the loop's step loss is
        # sum(w * loss) / targets.
        weighted = loss_weights is not None and any(w != 1.0 for w in loss_weights)
        self.loss_weights = torch.tensor(loss_weights, dtype=torch.float32) if weighted else None

    def _target_weights(self, batch: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
        """Per-target loss weights shaped like `like` (B, T) or (B,), from `task_ids`; None: unweighted."""
        ids = batch.get("task_ids")  # (B,) one task per row, or (1, N) per token of a packed row
        if self.loss_weights is None or ids is None:
            return None
        w = self.loss_weights.to(like.device)[ids]
        return w.reshape(-1, *([1] * (like.dim() - 1))).expand_as(like) if ids.dim() == 1 else w

    def forward(self, batch: dict[str, torch.Tensor]) -> LossSums:
        batch = to_device(batch, module_device(self.model))  # train.device: collated on the CPU, moved here
        weights, ids = None, batch.get("task_ids")
        if ids is not None:  # whose each row/token is: for routing and the loss weights, never a model input
            # Loss weights shape training; evaluation reports each task's plain loss.
            weights = self._target_weights(batch, batch["labels"]) if self.training else None
            batch = {k: v for k, v in batch.items() if k != "task_ids"}
        if "example_weights" in batch:  # data.weight_field: each example's loss weight, training only
            ew = batch["example_weights"]  # (B,) per row, or (1, N) per token of a packed row
            batch = {k: v for k, v in batch.items() if k != "example_weights"}
            if self.training:
                like = batch["labels"]  # (B, T) or (B,): one weight per target
                ew = ew.to(like.device)
                if ew.dim() == 1:
                    ew = ew.reshape(-1, *([1] * (like.dim() - 1))).expand_as(like)
                weights = ew if weights is None else weights * ew
        # Rows (tokens of a packed row) through their task's own head and adapter (methods/multitask.py).
        with multitask.rows(self.model, ids):
            if self.task == "causal-lm":
                per_token = ids is not None and ids.dim() == 2 and multitask.routes(self.model)
                return self._causal_lm(batch, weights, per_token)
            if self.task == "seq2seq":
                return self._seq2seq(batch, weights)
            if self.task == "masked-lm":
                return self._masked_lm(batch)
            return self._seq_cls(batch, weights)

    def _causal_lm(
        self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None, per_token: bool = False
    ) -> LossSums:
        perf, model = self.perf, self.model
        labels = batch["labels"]  # (B, T)
        inputs = {k: v for k, v in batch.items() if k in _INPUTS}
        body = model.base_model
        sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
        if (
            perf.varlen_attention
            and varlen.is_registered()
            and sdpa
            and _packed_row(batch)
            and _takes_kwargs(body)
        ):
            inputs[varlen.KWARG] = varlen.segments_from_positions(
                batch["position_ids"]
            )  # per-example attention
        target = labels[:, 1:]
        mask = target != IGNORE  # (B, T-1)
        read = F.pad(mask, (0, 1))  # (B, T): hidden position t is read when label t+1 is supervised
        # Not with per-token routing: the trimmed MLP sees fewer tokens than the routing names.
        trim = perf.trim_last_mlp and not tail.checkpointed(body) and not per_token
        # No KV cache in training: transformers isolates packed rows (position_ids restarting) only without one.
        with tail.supervised_only(body, read, trim):
            hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        h = hidden[:, :-1][mask]  # (N, H)
        y = target[mask]  # (N,)
        n = int(y.numel())
        if n == 0:
            return LossSums(hidden.sum() * 0.0, 0)
        if weights is None:
            return LossSums(self._lm_head_sum(h, y), n)
        w = weights[:, 1:][mask]  # (N,): the weight of each target's task
        # Targets grouped by weight value, each group's plain sum scaled: exact, and the fused kernel stays as is.
        total = sum(v * self._lm_head_sum(h[w == v], y[w == v]) for v in sorted(set(w.tolist())))
        return LossSums(total, n)

    def _lm_head_sum(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the LM head on hidden rows h (N, H) against targets y (N,)."""
        perf, n = self.perf, int(y.numel())
        head = self.model.get_output_embeddings()
        chunk = perf.loss_chunk_size
        if perf.fused_loss and _fusable(head):
            dtype = _autocast_dtype(h)
            if (
                dtype is not None
            ):  # mixed precision: the head GEMMs in the autocast dtype, softmax and sums in fp32
                b = head.bias.to(dtype) if head.bias is not None else None
                with torch.autocast(h.device.type, enabled=False):
                    return linear_cross_entropy_sum(h.to(dtype), head.weight.to(dtype), b, y, chunk)
            return linear_cross_entropy_sum(h, head.weight, head.bias, y, chunk)
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            hs, ys = h[start : start + chunk], y[start : start + chunk]
            if torch.is_grad_enabled() and n > chunk:
                # Recompute the chunk's logits in backward instead of keeping them alive.
                total = total + checkpoint(_head_ce_sum, head, hs, ys, use_reentrant=False)
            else:
                total = total + _head_ce_sum(head, hs, ys)
        return total

    def _seq2seq(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> LossSums:
        labels = batch["labels"]  # (B, T_out), IGNORE on pad
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels).logits.float()
        flat = logits.reshape(-1, logits.shape[-1])  # (B * T_out, V)
        if weights is None:
            loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        else:
            y = labels.reshape(-1)  # (B * T_out,)
            loss = (
                F.cross_entropy(flat, y, ignore_index=IGNORE, reduction="none") * weights.reshape(-1)
            ).sum()
        return LossSums(loss, int((labels != IGNORE).sum()))

    def _seq_cls(self, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> LossSums:
        labels = batch["labels"]  # (B,)
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()  # (B, C)
        correct = int((logits.argmax(-1) == labels).sum())
        if weights is None:
            loss = F.cross_entropy(logits, labels, reduction="sum")
        else:
            loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum()
        return LossSums(loss, int(labels.numel()), correct)

    def _masked_lm(self, batch: dict[str, torch.Tensor]) -> LossSums:
        """MLM (train.objective: mlm): cross-entropy of the MLM head at the masked positions (labels not IGNORE).
        The head runs on every position (its transform + decoder differ per architecture, so it is not split)."""
        labels = batch["labels"]  # (B, T): the original token where masked, IGNORE elsewhere
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()  # (B, T, V)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return LossSums(loss, int((labels != IGNORE).sum()))
