"""Prompt tuning and P-tuning: m learned virtual-token embeddings placed in front of each input.

Prompt tuning (Lester et al.) trains the m embeddings directly; P-tuning (Liu et al.) produces them with a small
encoder (LSTM or MLP), as PEFT does. A forward pre-hook on the backbone (`model.base_model`; the encoder stack for
T5) inserts the virtual tokens into inputs_embeds right before each row's first real token, extends the attention
mask, token types and position ids to match, and a forward hook removes those positions again from
`last_hidden_state`, so `sftlab.train.loss` stays aligned with input_ids. Inserting per row (not at column 0)
makes a left-padded row equal the same row unpadded; with right padding or none it is exactly PEFT's layout.
BERT's pooler reads the first virtual token (as in PEFT); T5's decoder cross-attends to the virtual tokens.

Files: PEFT's PROMPT_TUNING / P_TUNING layout, `prompt_embeddings` [m, hidden] (the P-tuning encoder is folded
away when saving, as PEFT does). Packed (padding-free) rows are refused: one prompt cannot precede each sequence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ._base import MethodConfigBase, MethodContext, MethodSpec
from ._kv_seam import (
    accepts,
    add_call_hook,
    backbone,
    cache_length,
    encoder_decoder_stacks,
    input_length,
    strip_output,
)
from ._prompt_files import HEAD_PREFIX, load_heads, peft_config, read_checked, save_adapter, train_heads
from ._targets import freeze_all

ATTR = "sftlab_prompt"
SOURCE_ATTR = "_sftlab_prompt_source"  # on hooked stacks: (VirtualTokens,)
PENDING_ATTR = "_sftlab_prompt_strip"  # set by the pre-hook when the forward hook must strip


class PTuningConfig(MethodConfigBase):
    name: Literal["ptuning"] = "ptuning"
    num_virtual_tokens: int = Field(
        16, ge=1, description="Number of virtual tokens m prepended to every input."
    )
    encoder: Literal["lstm", "mlp"] = Field(
        "mlp", description="Encoder producing the virtual tokens (PEFT's two)."
    )
    encoder_hidden: int | None = Field(
        None, ge=1, description="Encoder width; default: the model's hidden size."
    )


class PromptConfig(MethodConfigBase):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(
        16, ge=1, description="Number of virtual tokens m prepended to every input."
    )
    init: Literal["random", "text"] = Field(
        "random",
        description="random: normal at the scale of the word embeddings; text: from init_text's tokens.",
    )
    init_text: str | None = Field(
        None, description="Text whose token embeddings initialise the prompt (init: text)."
    )

    @model_validator(mode="after")
    def _text_given(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("method.init_text is required when method.init is 'text'")
        return self


class VirtualTokens(nn.Module):
    """m virtual-token embeddings, optionally produced by PEFT's P-tuning encoder (same parameter names)."""

    def __init__(self, m: int, dim: int, encoder: str | None = None, hidden: int | None = None):
        super().__init__()
        self.m, self.encoder = m, encoder
        hidden = hidden or dim
        self.embedding = nn.Embedding(m, dim)
        self.lstm_head = None
        self.mlp_head = None
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight  # (m, D)
        if self.lstm_head is not None:
            x = self.lstm_head(x[None])[0][0]  # (m, 2 * hidden)
        return x if self.mlp_head is None else self.mlp_head(x)  # (m, D)

    @torch.no_grad()
    def load_rows(self, rows: torch.Tensor) -> None:
        """Become plain embeddings holding `rows` (saved files are folded, the encoder is dropped)."""
        self.lstm_head = self.mlp_head = None
        self.encoder = None
        self.embedding.weight.copy_(rows.to(self.embedding.weight))


# ---- where the virtual tokens go ---------------------------------------------------------------------------


def _starts(mask: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor:
    """Index of each row's first real token, (B,): 0 without a mask or for an all-padding row."""
    if mask is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    return (mask != 0).int().argmax(dim=1)


def _insert_index(starts: torch.Tensor, t: int, m: int) -> torch.Tensor:
    """(B, T+m) indices into cat([virtual (m), real (T)]): virtual tokens land at [start, start+m) per row."""
    j = torch.arange(t + m, device=starts.device)[None]
    s = starts[:, None]
    return torch.where(j < s, j + m, torch.where(j < s + m, j - s, j))


def _keep_index(starts: torch.Tensor, t: int, m: int) -> torch.Tensor:
    """(B, T) indices of the real positions in a (B, T+m) sequence."""
    j = torch.arange(t, device=starts.device)[None]
    return torch.where(j < starts[:, None], j, j + m)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) gathered along dim 1 with idx (B, K)."""
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def _insert(real: torch.Tensor, virtual: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """real (B, T, ...) and virtual (B|1, m, ...) -> (B, T+m, ...)."""
    virtual = virtual.expand(real.shape[0], *virtual.shape[1:])
    return _take(torch.cat([virtual, real], dim=1), idx)


def _check_not_packed(pos: torch.Tensor, mask: torch.Tensor | None) -> None:
    step = pos[:, 1:] < pos[:, :-1]
    if mask is not None:
        step &= (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    if bool(step.any()):
        raise NotImplementedError(
            "prompt/P-tuning cannot run on packed rows (position_ids restart inside a row): a virtual prompt "
            "would precede only the first sequence. Turn packing off for this method."
        )


def _prefill(body: nn.Module, kw: dict, virtual: torch.Tensor) -> dict:
    """Insert the virtual tokens into a call that starts a sequence; mark the output for stripping."""
    b, t = input_length(kw)
    m = virtual.shape[0]
    embeds = kw.pop("inputs_embeds", None)
    if embeds is None:
        embeds = body.get_input_embeddings()(kw["input_ids"])  # (B, T, D)
    kw["input_ids"] = None
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise NotImplementedError("prompt/P-tuning needs a 2-D attention_mask (B, T)")
    starts = _starts(mask, b, embeds.device)
    idx = _insert_index(starts, t, m)  # (B, T+m)
    kw["inputs_embeds"] = _insert(embeds, virtual.to(embeds.dtype)[None], idx)  # (B, T+m, D)
    if mask is not None:
        kw["attention_mask"] = _insert(mask, mask.new_ones((1, m)), idx)
    if kw.get("token_type_ids") is not None:
        tt = kw["token_type_ids"]
        kw["token_type_ids"] = _insert(tt, tt.new_zeros((1, m)), idx)
    if accepts(body, "position_ids"):
        pos = kw.get("position_ids")
        if pos is None:
            pos = (
                (mask.long().cumsum(1) - 1).clamp(min=0)
                if mask is not None
                else torch.arange(t, device=idx.device)
            )
        pos = pos.expand(b, t) if pos.dim() == 2 else pos[None].expand(b, t)
        _check_not_packed(pos, mask)
        first = pos.gather(1, starts[:, None])  # (B, 1): position of the first real token
        virt_pos = first + torch.arange(m, device=pos.device)[None]  # (B, m)
        kw["position_ids"] = _take(torch.cat([virt_pos, pos + m], dim=1), idx)  # (B, T+m)
    object.__setattr__(body, PENDING_ATTR, (starts, t, m))
    return kw


def _decode_step(body: nn.Module, kw: dict, m: int) -> dict:
    """A cached step: the cache already holds the virtual tokens; widen the mask and shift positions to match."""
    _, q = input_length(kw)
    past = cache_length(kw)
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == past + q - m:
        idx = _insert_index(_starts(mask, mask.shape[0], mask.device), mask.shape[1], m)
        mask = kw["attention_mask"] = _insert(mask, mask.new_ones((1, m)), idx)
    if accepts(body, "position_ids"):
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + m
        elif mask is not None and mask.dim() == 2:
            kw["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -q:]
    return kw


def _before_backbone(body: nn.Module, kw: dict) -> dict:
    (source,) = getattr(body, SOURCE_ATTR)
    if cache_length(kw) == 0:
        return _prefill(body, kw, source())
    return _decode_step(body, kw, source.m)


def _after_backbone(body: nn.Module, args: tuple, output):
    pending = body.__dict__.pop(PENDING_ATTR, None)
    if pending is None or getattr(body, "_sftlab_keep_virtual", False):
        return output
    starts, t, m = pending
    keep = _keep_index(starts, t, m)  # (B, T)
    return strip_output(output, lambda h: _take(h, keep))


def _before_decoder(dec: nn.Module, kw: dict) -> dict:
    """T5 decoder: the encoder output carries m extra positions; widen the encoder mask to match."""
    (source,) = getattr(dec, SOURCE_ATTR)
    mask, enc = kw.get("encoder_attention_mask"), kw.get("encoder_hidden_states")
    if mask is not None and enc is not None and mask.dim() == 2 and mask.shape[1] + source.m == enc.shape[1]:
        idx = _insert_index(_starts(mask, mask.shape[0], mask.device), mask.shape[1], source.m)
        kw["encoder_attention_mask"] = _insert(mask, mask.new_ones((1, source.m)), idx)
    return kw


def add_virtual_tokens(model: nn.Module, source: VirtualTokens) -> None:
    """Register `source` on the model and hook the backbone (or T5's encoder and decoder stacks)."""
    model.add_module(ATTR, source)
    stacks = encoder_decoder_stacks(model)
    body = stacks[0] if stacks else backbone(model)
    object.__setattr__(body, SOURCE_ATTR, (source,))
    add_call_hook(body, _before_backbone)
    body.register_forward_hook(_after_backbone)
    if stacks:
        body._sftlab_keep_virtual = True  # the decoder cross-attends to them
        object.__setattr__(stacks[1], SOURCE_ATTR, (source,))
        add_call_hook(stacks[1], _before_decoder)


# ---- method functions ---------------------------------------------------------------------------------------


def _dim(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]


def _text_init(model: nn.Module, cfg: PromptConfig, ctx: MethodContext) -> torch.Tensor:
    """PEFT's TEXT init: the text's token embeddings, cut or repeated to m rows."""
    if ctx.tokenizer is None:
        raise ValueError("method.init: text needs a tokenizer")
    ids = ctx.tokenizer(cfg.init_text)["input_ids"]
    if not ids:
        raise ValueError(f"method.init_text {cfg.init_text!r} tokenizes to nothing")
    m = cfg.num_virtual_tokens
    ids = (ids * math.ceil(m / len(ids)))[:m]
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(ids, device=emb.weight.device)).detach().clone()


def _apply(model: nn.Module, cfg: PTuningConfig | PromptConfig, ctx: MethodContext) -> None:
    if hasattr(model, ATTR):
        raise ValueError("prompt/P-tuning is already applied to this model")
    freeze_all(model)
    dim, weight = _dim(model), model.get_input_embeddings().weight
    if isinstance(cfg, PTuningConfig):
        source = VirtualTokens(cfg.num_virtual_tokens, dim, cfg.encoder, cfg.encoder_hidden)
    else:
        source = VirtualTokens(cfg.num_virtual_tokens, dim)
        with torch.no_grad():
            if cfg.init == "text":
                source.embedding.weight.copy_(_text_init(model, cfg, ctx))
            else:
                source.embedding.weight.normal_(0.0, float(weight.float().std()))
    add_virtual_tokens(model, source.to(device=weight.device))
    train_heads(model, ctx)


def _source(model: nn.Module) -> VirtualTokens:
    src = getattr(model, ATTR, None)
    if not isinstance(src, VirtualTokens):
        raise ValueError("this model has no virtual tokens: run the method's apply() first")
    return src


def _peft_type(cfg) -> str:
    return "P_TUNING" if isinstance(cfg, PTuningConfig) else "PROMPT_TUNING"


def _save(model: nn.Module, cfg: PTuningConfig | PromptConfig, out_dir: Path, ctx: MethodContext) -> None:
    src = _source(model)
    common = {
        "num_virtual_tokens": src.m,
        "token_dim": _dim(model),
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "num_attention_heads": getattr(model.config, "num_attention_heads", None),
    }
    if isinstance(cfg, PTuningConfig):
        fields = {
            "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden or _dim(model),
            "encoder_num_layers": 2,
            "encoder_dropout": 0.0,
        }
    else:
        text = cfg.init == "text"
        fields = {
            "prompt_tuning_init": "TEXT" if text else "RANDOM",
            "prompt_tuning_init_text": cfg.init_text if text else None,
            "tokenizer_name_or_path": (ctx.base_model_name or None) if text else None,
            "tokenizer_kwargs": None,
        }
    config = peft_config(_peft_type(cfg), model, ctx, **common, **fields)
    with torch.no_grad():
        rows = src()
    save_adapter(model, ctx, out_dir, config, rows)


def _load(model: nn.Module, cfg: PTuningConfig | PromptConfig, in_dir: Path, ctx: MethodContext) -> None:
    src = _source(model)
    config, rows, rest = read_checked(in_dir, _peft_type(cfg))
    # PEFT saves 2*m rows for encoder-decoder models (num_transformer_submodules=2); only the first m feed
    # the encoder, the rest are never used by prompt/P-tuning.
    rows = (
        rows[: src.m]
        if rows.shape[0] == 2 * src.m and config.get("num_transformer_submodules") == 2
        else rows
    )
    if tuple(rows.shape) != (src.m, _dim(model)):
        raise ValueError(
            f"{in_dir}: prompt of shape {tuple(rows.shape)}, this model needs {(src.m, _dim(model))}"
        )
    src.load_rows(rows)
    load_heads(model, ctx, rest, in_dir)


METHODS = {
    "ptuning": MethodSpec(
        "ptuning",
        PTuningConfig,
        _apply,
        _save,
        _load,
        help="P-tuning: virtual input tokens produced by a small LSTM/MLP encoder.",
        saved_prefix=HEAD_PREFIX,
    ),
    "prompt": MethodSpec(
        "prompt",
        PromptConfig,
        _apply,
        _save,
        _load,
        help="Prompt tuning: learned virtual input tokens (soft prompt).",
        saved_prefix=HEAD_PREFIX,
    ),
}
