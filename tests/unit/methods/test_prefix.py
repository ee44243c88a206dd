"""Prefix tuning: exact no-op cases, an explicit reference, PEFT parity, folding and PEFT files both ways."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _prompt_helpers import applied, base, inputs, randomize, real_positions
from helpers import FAMILIES, PEFT_TASK
from torch.testing import assert_close

from sftlab.methods import _kv_seam
from sftlab.methods._targets import count_parameters
from sftlab.methods.prefix import add_prefix

peft = pytest.importorskip("peft")


def _logits(model, batch, **extra):
    with torch.no_grad():
        return model(**batch, **extra).logits


def _shifted(task: str, batch: dict, m: int) -> dict:
    """Position ids the prefix implies (real tokens at m..); T5 has relative positions and needs none."""
    if task == "seq2seq":
        return {}
    b, t = batch["input_ids"].shape
    return {"position_ids": torch.arange(m, m + t)[None].expand(b, t)}


def hide_prefix(monkeypatch) -> None:
    """Every query scores the prefix at -inf: the seam's mask with its m prefix columns turned to "never attend"."""
    extend = _kv_seam._extend_mask

    def hidden(module, query, kv_len, mask, m, kwargs):
        out = extend(module, query, kv_len, mask, m, kwargs)
        if out is None:  # "attend to everything": spell it out so the prefix columns can be closed
            out = torch.ones((1, 1, query.shape[2], m + kv_len), dtype=torch.bool, device=query.device)
        out = out.clone()
        out[..., :m] = False if out.dtype == torch.bool else torch.finfo(out.dtype).min
        return out

    monkeypatch.setattr(_kv_seam, "_extend_mask", hidden)


@pytest.mark.parametrize("name,task", FAMILIES)
def test_empty_or_masked_prefix_reproduces_the_base_model(name, task, monkeypatch):
    model, tok = base(name, task)
    batch = inputs(task)

    def real(x):  # pad positions carry no meaning (their position ids differ)
        return real_positions(x, batch, task)

    ref = _logits(model, batch)
    empty = copy.deepcopy(model)
    add_prefix(empty, 0)
    assert_close(real(_logits(empty, batch)), real(ref), rtol=0, atol=1e-6)

    _, tuned, _, _ = applied(name, task, "prefix", num_virtual_tokens=4)
    randomize(tuned.sftlab_prefix, std=2.0)  # the seq-cls head stays the base model's
    shifted = real(_logits(model, batch, **_shifted(task, batch, 4)))
    visible = real(_logits(tuned, batch))
    assert (visible - shifted).abs().max() > 1e-3  # the prefix does something
    hide_prefix(monkeypatch)
    assert_close(real(_logits(tuned, batch)), shifted, rtol=1e-5, atol=1e-5)


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None].float() * inv[None]  # (T, d/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def llama_with_prefix_reference(model, ids: torch.Tensor, prefix) -> torch.Tensor:
    """Llama forward written out by hand, with each layer's prefix K/V concatenated explicitly. ids (1, T)."""
    cfg, inner = model.config, model.model
    n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // n_h
    t, m = ids.shape[1], prefix.m
    pos = torch.arange(m, m + t)  # real tokens follow the m prefix slots
    allowed = torch.ones(t, m + t, dtype=torch.bool)
    allowed[:, m:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    h = inner.embed_tokens(ids)  # (1, T, D)
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        x = _rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = a.q_proj(x).view(1, t, n_h, d).transpose(1, 2)  # (1, H, T, d)
        k = a.k_proj(x).view(1, t, n_kv, d).transpose(1, 2)  # (1, Hkv, T, d)
        v = a.v_proj(x).view(1, t, n_kv, d).transpose(1, 2)
        q, k = (
            _rope(q, pos, cfg.rope_parameters["rope_theta"]),
            _rope(k, pos, cfg.rope_parameters["rope_theta"]),
        )
        pk, pv = prefix.layer_kv(i, torch.float32, ids.device)  # (1, Hkv, m, d)
        k = torch.cat([pk, k], 2).repeat_interleave(n_h // n_kv, dim=1)  # (1, H, m+T, d)
        v = torch.cat([pv, v], 2).repeat_interleave(n_h // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (1, H, T, m+T)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        h = h + a.o_proj((probs @ v).transpose(1, 2).reshape(1, t, n_h * d))
        x = _rms(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        h = h + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
    return model.lm_head(_rms(h, inner.norm.weight, cfg.rms_norm_eps))


@pytest.mark.parametrize("reparameterize", [False, True])
def test_llama_prefix_matches_explicit_kv_concatenation(reparameterize):
    _, tuned, _, _ = applied("tiny-llama", "causal-lm", "prefix", num_virtual_tokens=5,
                             reparameterize=reparameterize, prefix_hidden=16)  # fmt: skip
    randomize(tuned, std=1.0)
    ids = torch.randint(4, 260, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = llama_with_prefix_reference(tuned, ids, tuned.sftlab_prefix)
        assert_close(tuned(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def _peft_prefix(model, task: str, m: int):
    cfg = peft.PrefixTuningConfig(task_type=PEFT_TASK[task], num_virtual_tokens=m)
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prefix_parity_with_peft_and_files_both_ways(name, tmp_path):
    """Same prefix tensor -> same logits as PEFT; PEFT's files load here and ours load in PEFT."""
    model, tuned, cfg, ctx = applied(name, "causal-lm", "prefix", num_virtual_tokens=4)
    pm = _peft_prefix(model, "causal-lm", 4)
    tuned.sftlab_prefix.load_rows(pm.get_prompt_embedding_to_save("default"))
    batch = inputs("causal-lm")
    ours, theirs = _logits(tuned, batch), _logits(pm, batch)
    assert_close(real_positions(ours, batch, "causal-lm"), real_positions(theirs, batch, "causal-lm"))

    pm.save_pretrained(tmp_path / "peft")
    _, fresh, _, _ = applied(name, "causal-lm", "prefix", num_virtual_tokens=4)
    from sftlab.methods import get_method

    get_method("prefix").load(fresh, cfg, tmp_path / "peft", ctx)
    assert_close(_logits(fresh, batch), ours)

    randomize(tuned, std=1.0)
    get_method("prefix").save(tuned, cfg, tmp_path / "ours", ctx)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    assert_close(real_positions(_logits(loaded, batch), batch, "causal-lm"),
                 real_positions(_logits(tuned, batch), batch, "causal-lm"))  # fmt: skip


def test_peft_cannot_prefix_bert_but_sftlab_can():
    """Documents the gap: PEFT 0.21 fails at the first forward on BERT; ours trains a seq-cls model."""
    model, tuned, _, _ = applied("tiny-bert", "seq-cls", "prefix")
    batch = inputs("seq-cls")
    with pytest.raises(ValueError, match="past key values"):
        _peft_prefix(model, "seq-cls", 3)(**batch)
    randomize(tuned, std=1.0)
    assert (_logits(tuned, batch) - _logits(model, batch)).abs().max() > 1e-3


def test_t5_prefix_covers_every_attention_site_and_rejects_peft_layout(tmp_path):
    """PEFT prefixes only T5's decoder self-attention (num_layers=2 rows); sftlab has 6 sites and says so."""
    model, tuned, cfg, ctx = applied("tiny-t5", "seq2seq", "prefix")
    assert tuned.sftlab_prefix.n_sites == 6  # 2 encoder self + 2 decoder self + 2 cross
    _peft_prefix(model, "seq2seq", 3).save_pretrained(tmp_path)
    from sftlab.methods import get_method

    with pytest.raises(ValueError, match="decoder self-attention"):
        get_method("prefix").load(tuned, cfg, tmp_path, ctx)


def test_reparameterized_prefix_is_folded_when_saved(tmp_path):
    from sftlab.methods import get_method
    from sftlab.methods.peft_format import read_adapter

    _, tuned, cfg, ctx = applied("tiny-llama", "causal-lm", "prefix", reparameterize=True, prefix_hidden=8)
    randomize(tuned, std=0.5)
    batch = inputs("causal-lm")
    get_method("prefix").save(tuned, cfg, tmp_path, ctx)
    config, tensors = read_adapter(tmp_path)
    assert config["prefix_projection"] is True and config["peft_type"] == "PREFIX_TUNING"
    assert list(tensors) == ["prompt_embeddings"] and tuple(tensors["prompt_embeddings"].shape) == (
        3,
        2 * 2 * 32,
    )
    _, fresh, _, _ = applied("tiny-llama", "causal-lm", "prefix", reparameterize=True, prefix_hidden=8)
    get_method("prefix").load(fresh, cfg, tmp_path, ctx)
    assert fresh.sftlab_prefix.transform is None  # inference pays nothing for the MLP
    assert_close(_logits(fresh, batch), _logits(tuned, batch))


def test_trainable_parameters_are_the_prefix_only():
    """m=16 on tiny-llama: 16 x (2 layers x 2 (K,V) x 2 kv-heads x 16 head-dim) = 2048."""
    _, tuned, _, _ = applied("tiny-llama", "causal-lm", "prefix", num_virtual_tokens=16)
    assert count_parameters(tuned)[0] == 16 * 2 * 2 * 2 * 16
    names = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert names == {"sftlab_prefix.embedding.weight"}
