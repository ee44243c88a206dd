"""Adapter insertion map: mapped architectures resolve, unknown ones fall back by name or fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartModel,
    DistilBertConfig,
    DistilBertModel,
    GPTNeoXConfig,
    GPTNeoXModel,
    OPTConfig,
    OPTModel,
    Qwen2Config,
    Qwen2Model,
)

from sftlab.methods.adapter import AdapterConfig, add_adapter, set_adapter
from sftlab.methods.adapter.adapter_map import INSERTION_MAP, ArchPoints, find_insertion_points

SMALL = {"vocab_size": 64}
OTHER_ARCHS = [
    (Qwen2Model, Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **SMALL), 2, 2),
    (GPTNeoXModel, GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 **SMALL), 2, 2),
    (OPTModel, OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, **SMALL), 2, 2),
    (DistilBertModel, DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, **SMALL), 2, 2),
    # BART: encoder blocks (self-attn + FFN) and decoder blocks (self-attn + cross-attn + FFN)
    (BartModel, BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, **SMALL), 6, 4),
]  # fmt: skip


@pytest.mark.parametrize("cls,cfg,n_attn,n_ffn", OTHER_ARCHS, ids=lambda v: getattr(v, "__name__", ""))
def test_mapped_architectures_resolve_and_start_as_identity(cls, cfg, n_attn, n_ffn):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    assert cfg.model_type in INSERTION_MAP
    points = find_insertion_points(model, "houlsby")
    assert sum(p.kind == "attn" for p in points) == n_attn and sum(p.kind == "ffn" for p in points) == n_ffn
    assert len(find_insertion_points(model, "pfeiffer")) == n_ffn
    ids = torch.randint(3, 64, (2, 6))
    kw = {"decoder_input_ids": ids} if cls is BartModel else {}
    with torch.no_grad():
        ref = model(input_ids=ids, **kw).last_hidden_state
    add_adapter(model, "a", AdapterConfig(bottleneck_size=4))
    set_adapter(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, **kw).last_hidden_state, ref, rtol=0, atol=0)


class _Block(nn.Module):
    def __init__(self, attn_out: str, ffn_out: str):
        super().__init__()
        self.attention = nn.Module()
        self.attention.qkv = nn.Linear(8, 24)
        self.attention.add_module(attn_out, nn.Linear(8, 8))
        self.ffn = nn.Module()
        self.ffn.up = nn.Linear(8, 16)
        self.ffn.add_module(ffn_out, nn.Linear(16, 8))


class _Toy(nn.Module):
    def __init__(self, attn_out: str, ffn_out: str):
        super().__init__()
        self.layers = nn.ModuleList(_Block(attn_out, ffn_out) for _ in range(3))


def test_unknown_architecture_falls_back_to_module_names():
    points = find_insertion_points(_Toy("out_proj", "down_proj"), "houlsby")
    assert [(p.name, p.kind) for p in points[:2]] == [
        ("layers.0.attention.out_proj", "attn"),
        ("layers.0.ffn.down_proj", "ffn"),
    ]
    assert len(points) == 6


def test_unknown_architecture_without_clean_names_says_which_entry_to_add():
    with pytest.raises(ValueError) as e:
        find_insertion_points(_Toy("mix", "squash"), "houlsby")
    msg = str(e.value)
    assert "model_type '_toy'" in msg and "INSERTION_MAP" in msg and "ArchPoints(attn=" in msg
    assert "attention.mix" in msg and "ffn.squash" in msg  # lists the block's projections to pick from
    INSERTION_MAP["_toy"] = ArchPoints(attn=("attention.mix",), ffn=("ffn.squash",))
    try:
        assert len(find_insertion_points(_Toy("mix", "squash"), "pfeiffer")) == 3
    finally:
        del INSERTION_MAP["_toy"]
