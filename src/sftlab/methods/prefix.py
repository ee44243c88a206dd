"""Prefix tuning (Li & Liang 2021): every attention layer attends to m learned key/value vectors first.

The base stays frozen; attention runs over [P_k, K] and [P_v, V]. The prefix is injected through transformers'
attention-function interface (see `_kv_seam`), never through the KV cache: the cache holds only real tokens,
so cached generation and padding work exactly as in the base model. As in Li & Liang and PEFT, real tokens sit at
positions m.. (a backbone pre-hook shifts position_ids; absent ones are counted from the attention mask), so
PEFT-trained prefixes give PEFT's logits here. The prefix keys carry no rotary/relative position (T5: zero bias).

Layout (PEFT's PREFIX_TUNING): one tensor of shape [m, n_layers * 2 * n_kv_heads * head_dim], the last axis read
as (layer, key|value, head, head_dim). "Layers" are attention sites in call order: for decoders and BERT the
blocks; for T5 the encoder self-attention blocks, then each decoder block's self- and cross-attention. PEFT itself
prefixes only T5's decoder self-attention (and cannot run prefix tuning on BERT), so T5 prefix files do not mean
the same thing in PEFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ._base import MethodConfigBase, MethodContext, MethodSpec
from ._kv_seam import (
    accepts,
    add_call_hook,
    attach_sites,
    backbone,
    cache_length,
    input_length,
    install_prefix_attention,
)
from ._prompt_files import HEAD_PREFIX, load_heads, peft_config, read_checked, save_adapter, train_heads
from ._targets import freeze_all

ATTR = "sftlab_prefix"


class PrefixConfig(MethodConfigBase):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, ge=1, description="Prefix length m: key/value vectors per layer.")
    reparameterize: bool = Field(
        False,
        description="Train the prefix through an MLP (token_dim -> prefix_hidden -> layers*2*token_dim), as in "
        "Li & Liang; the MLP is folded into the plain prefix when saving.",
    )
    prefix_hidden: int = Field(512, ge=1, description="Hidden width of the reparameterization MLP.")


class PrefixKV(nn.Module):
    """The learned prefix for n_sites attention layers: direct rows, or rows produced by an MLP."""

    def __init__(
        self, m: int, n_sites: int, n_kv_heads: int, head_dim: int, reparameterize: bool, hidden: int
    ):
        super().__init__()
        self.m, self.n_sites, self.n_kv_heads, self.head_dim = m, n_sites, n_kv_heads, head_dim
        self.token_dim = n_kv_heads * head_dim
        width = n_sites * 2 * self.token_dim
        if reparameterize:
            self.embedding = nn.Embedding(m, self.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(self.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)
            )
        else:
            self.embedding = nn.Embedding(m, width)
            self.transform = None

    def rows(self) -> torch.Tensor:
        """The full prefix, (m, n_sites * 2 * token_dim): what PEFT saves as prompt_embeddings."""
        w = self.embedding.weight
        return w if self.transform is None else self.transform(w)

    def layer_kv(
        self, index: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix key and value for one site, each (1, n_kv_heads, m, head_dim)."""
        span = slice(index * 2 * self.token_dim, (index + 1) * 2 * self.token_dim)
        if self.transform is None:
            block = self.embedding.weight[:, span]  # (m, 2 * token_dim)
        else:
            # Only this site's output rows of the last Linear: the MLP never materialises every layer per call.
            hidden = self.transform[1](self.transform[0](self.embedding.weight))  # (m, hidden)
            last = self.transform[2]
            block = F.linear(hidden, last.weight[span], last.bias[span])
        kv = block.to(device=device, dtype=dtype).view(self.m, 2, self.n_kv_heads, self.head_dim)
        kv = kv.permute(1, 2, 0, 3).unsqueeze(1)  # (2, 1, Hkv, m, d)
        return kv[0], kv[1]

    @torch.no_grad()
    def load_rows(self, rows: torch.Tensor) -> None:
        """Become a plain prefix holding `rows` (the MLP, if any, is dropped: saved files are folded)."""
        rows = rows.to(self.embedding.weight)
        if self.transform is not None:
            self.transform = None
            self.embedding = nn.Embedding(self.m, rows.shape[1], device=rows.device, dtype=rows.dtype)
        self.embedding.weight.copy_(rows)


def prefix_module(model: nn.Module) -> PrefixKV:
    mod = getattr(model, ATTR, None)
    if not isinstance(mod, PrefixKV):
        raise ValueError("this model has no prefix: run the prefix method's apply() first")
    return mod


def add_prefix(model: nn.Module, m: int, reparameterize: bool = False, hidden: int = 512) -> PrefixKV:
    """Install the prefix attention seam and attach a fresh m-token prefix to every attention site."""
    if hasattr(model, ATTR):
        raise ValueError("prefix tuning is already applied to this model")
    sites = install_prefix_attention(model)
    shapes = {(h, d) for _, h, d in sites}
    if len(shapes) != 1:
        raise ValueError(f"prefix tuning needs one K/V shape across attention layers; found {sorted(shapes)}")
    ((n_kv, head_dim),) = shapes
    ref = next(model.parameters())
    prefix = PrefixKV(m, len(sites), n_kv, head_dim, reparameterize, hidden).to(device=ref.device)
    model.add_module(ATTR, prefix)
    attach_sites(sites, prefix)
    body = backbone(model)
    if not getattr(model.config, "is_encoder_decoder", False) and accepts(body, "position_ids"):
        body._sftlab_prefix_shift = m  # read by the hook through `body`, so deep copies stay consistent
        add_call_hook(body, _shift_positions)
    return prefix


def _shift_positions(body: nn.Module, kwargs: dict) -> dict:
    """Real tokens sit at positions m.. as if the prefix were m earlier tokens (Li & Liang; PEFT does the same).

    Keeps adapters trained with PEFT exact in sftlab and vice versa. Without position_ids they are counted from
    the attention mask, so a left-padded row matches the row alone. T5 needs nothing: relative positions.
    """
    m = body._sftlab_prefix_shift
    pos = kwargs.get("position_ids")
    if pos is None:
        _, t = input_length(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            pos = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -t:]  # (B, T)
        else:
            ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            past = cache_length(kwargs)
            pos = torch.arange(past, past + t, device=ref.device)[None]  # (1, T)
    kwargs["position_ids"] = pos + m
    return kwargs


def _apply(model: nn.Module, cfg: PrefixConfig, ctx: MethodContext) -> None:
    freeze_all(model)
    add_prefix(model, cfg.num_virtual_tokens, cfg.reparameterize, cfg.prefix_hidden)
    train_heads(model, ctx)


def _save(model: nn.Module, cfg: PrefixConfig, out_dir: Path, ctx: MethodContext) -> None:
    prefix = prefix_module(model)
    config = peft_config(
        "PREFIX_TUNING",
        model,
        ctx,
        num_virtual_tokens=prefix.m,
        token_dim=prefix.token_dim,
        num_attention_heads=prefix.n_kv_heads,
        num_layers=prefix.n_sites,
        encoder_hidden_size=cfg.prefix_hidden,
        prefix_projection=cfg.reparameterize,
        init_weights=None,
    )
    with torch.no_grad():
        rows = prefix.rows()
    save_adapter(model, ctx, out_dir, config, rows)


def _load(model: nn.Module, cfg: PrefixConfig, in_dir: Path, ctx: MethodContext) -> None:
    prefix = prefix_module(model)
    config, rows, rest = read_checked(in_dir, "PREFIX_TUNING")
    want = (prefix.m, prefix.n_sites * 2 * prefix.token_dim)
    if tuple(rows.shape) != want:
        hint = ""
        if getattr(model.config, "is_encoder_decoder", False) and config.get("num_layers") != prefix.n_sites:
            hint = " (PEFT's encoder-decoder prefix covers only decoder self-attention; sftlab prefixes every site)"
        raise ValueError(
            f"{in_dir}: prefix of shape {tuple(rows.shape)} (num_layers={config.get('num_layers')}), this model "
            f"needs {want} for {prefix.n_sites} attention layers and m={prefix.m}{hint}"
        )
    prefix.load_rows(rows)
    load_heads(model, ctx, rest, in_dir)


METHOD = MethodSpec(
    "prefix",
    PrefixConfig,
    _apply,
    _save,
    _load,
    help="Prefix tuning: learned key/value vectors in front of every attention layer.",
    saved_prefix=HEAD_PREFIX,
)
