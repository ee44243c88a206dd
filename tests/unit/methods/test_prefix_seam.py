"""Pins the transformers seams that prefix/prompt tuning rely on: an upgrade that moves them fails here first."""

from __future__ import annotations

import inspect

import pytest
import torch
from _prompt_helpers import applied, base, inputs
from helpers import FAMILIES
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sftlab.methods import _kv_seam

# Attention sites per family, in call order (what the prefix rows are laid out by).
SITES = {
    "tiny-llama": ["model.layers.0.self_attn", "model.layers.1.self_attn"],
    "tiny-gpt2": ["transformer.h.0.attn", "transformer.h.1.attn"],
    "tiny-bert": ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"],
    "tiny-t5": [
        "encoder.block.0.layer.0.SelfAttention",
        "encoder.block.1.layer.0.SelfAttention",
        "decoder.block.0.layer.0.SelfAttention",
        "decoder.block.0.layer.1.EncDecAttention",
        "decoder.block.1.layer.0.SelfAttention",
        "decoder.block.1.layer.1.EncDecAttention",
    ],
}


@pytest.mark.parametrize("name,task", FAMILIES)
def test_every_family_routes_attention_through_the_interface(name, task):
    _, tuned, _, _ = applied(name, task, "prefix")
    names = {id(mod): n for n, mod in tuned.named_modules()}
    sites = [None] * tuned.sftlab_prefix.n_sites
    for mod in tuned.modules():
        site = getattr(mod, _kv_seam.SITE_ATTR, None)
        if site is not None:
            sites[site[1]] = names[id(mod)]
    assert sites == SITES[name]
    # Every (sub)config, T5's encoder/decoder stacks included, now dispatches to our function and mask builder.
    configs = {id(m.config): m.config for m in tuned.modules() if hasattr(m, "config")}
    assert {c._attn_implementation for c in configs.values()} == {_kv_seam.PREFIX_ATTN}
    assert ALL_ATTENTION_FUNCTIONS[_kv_seam.PREFIX_ATTN] is _kv_seam.prefix_attention
    assert _kv_seam.PREFIX_ATTN in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_kv_cache_never_holds_the_prefix(name):
    """The prefix joins K/V inside attention, after the cache update: the cache length is the real length."""
    _, tuned, _, _ = applied(name, "causal-lm", "prefix")
    batch = inputs("causal-lm")
    with torch.no_grad():
        out = tuned(**batch, use_cache=True)
    assert out.cache.get_seq_length() == batch["input_ids"].shape[1]


@pytest.mark.parametrize("name,task", FAMILIES)
def test_backbone_call_keywords_the_hooks_rely_on(name, task):
    """Prompt hooks edit these keyword names on the backbone (T5: encoder/decoder stacks)."""
    model, _ = base(name, task)
    stacks = _kv_seam.encoder_decoder_stacks(model)
    body = stacks[0] if stacks else _kv_seam.backbone(model)
    params = inspect.signature(body.forward).parameters
    assert {"input_ids", "inputs_embeds", "attention_mask"} <= set(params)
    assert "cache" in params  # 5.24 name; past_key_values is a deprecated alias (both handled)
    assert ("position_ids" in params) == (name != "tiny-t5")
    if stacks:
        assert {"encoder_hidden_states", "encoder_attention_mask"} <= set(
            inspect.signature(stacks[1].forward).parameters
        )
    assert body.get_input_embeddings().weight is model.get_input_embeddings().weight  # T5: tied to `shared`


def test_attention_with_flash_implementation_is_refused():
    model, _ = base("tiny-llama", "causal-lm")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        _kv_seam.install_prefix_attention(model)
