"""The fused RoPE gives transformers' values and gradients, is really used, and leaves the module as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import compute_loss, patched, with_lora
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama

from sftlab.data.batching import collate_packed
from sftlab.models import build_tiny, enable_activation_checkpointing
from sftlab.train import rope

IGN = -100


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (9, 23, 5, 16):
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        exs.append({"input_ids": ids, "labels": [IGN] * (n // 2) + ids[n // 2 :]})
    return collate_packed(exs, "causal-lm")


def _tiny_qwen2():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)


def _loss_and_grads(model, batch, on: bool):
    model.zero_grad(set_to_none=True)
    loss, _ = compute_loss(model, batch, "causal-lm", fused_rope=on)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["tiny-llama", "qwen2"])
def test_fused_rope_matches_transformers_and_is_used(family, monkeypatch):
    model = with_lora(build_tiny(family)[0] if family == "tiny-llama" else _tiny_qwen2(), family)
    batch = _batch(model.config.vocab_size)
    assert rope._rope_modules(model.base_model)  # the one-time probe (which calls _Rope itself) done first
    calls = []
    real = rope._Rope.apply
    monkeypatch.setattr(rope._Rope, "apply", lambda *a: calls.append(1) or real(*a))
    ref_loss, ref = _loss_and_grads(model, batch, on=False)
    assert calls == []
    loss, got = _loss_and_grads(model, batch, on=True)
    assert len(calls) == 2 * model.config.num_hidden_layers  # q and k in every layer
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert ref.keys() == got.keys() and ref
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-4, atol=1e-6)


def test_module_function_is_restored_even_when_the_forward_fails():
    model, _ = build_tiny("tiny-llama")
    original = modeling_llama.apply_rotary_pos_emb
    with pytest.raises(RuntimeError, match="boom"), rope.fused_rope(model.base_model):
        assert modeling_llama.apply_rotary_pos_emb is not original  # swapped inside
        raise RuntimeError("boom")
    assert modeling_llama.apply_rotary_pos_emb is original


def test_not_swapped_under_activation_checkpointing(monkeypatch):
    model, _ = build_tiny("tiny-llama")
    enable_activation_checkpointing(model)
    model.train()
    calls = []
    monkeypatch.setattr(rope._Rope, "apply", lambda *a: calls.append(1))
    # backward recomputes the blocks: it runs inside the patches, as the trainer's steps do
    with patched(model):
        compute_loss(model, _batch(model.config.vocab_size), "causal-lm")[0].backward()
    assert calls == []


def test_probe_rejects_a_different_rotation_and_uncovered_calls_reach_the_original():
    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style pairs (x0, x1), (x2, x3), ...
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

        c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * c + rot(q) * s, k * c + rot(k) * s

    def first_half_cos(
        q, k, cos, sin, unsqueeze_dim=1
    ):  # right for real RoPE (equal halves), wrong in general
        h = cos.shape[-1] // 2
        return modeling_llama.apply_rotary_pos_emb(q, k, cos[..., :h].repeat(1, 1, 2), sin, unsqueeze_dim)

    assert rope._probe(modeling_llama.apply_rotary_pos_emb)
    assert not rope._probe(interleaved)
    assert not rope._probe(first_half_cos)
    seen = []
    fused = rope._make(lambda *a, **k: seen.append(1) or "original")
    q = torch.randn(1, 2, 5, 8)
    assert (
        fused(q, q, torch.randn(1, 5, 4), torch.randn(1, 5, 4)) == "original"
    )  # partial rotary: not covered
    assert seen == [1]
