"""Padding-free packing: a packed row gives each example exactly what it gets alone (logits, loss, gradients),
with per-example (varlen) attention and with transformers' masked path; token budgets cover every example once."""

from __future__ import annotations

import pytest
import torch
from helpers import compute_loss, with_lora

from sftlab.data import collate, collate_packed, token_budget_batches
from sftlab.methods import MethodContext, get_method
from sftlab.models import build_tiny
from sftlab.train import varlen
from sftlab.train.packing import packed_rows_isolated, resolve_packing

IGN = -100


def _examples(lengths=(7, 12, 4, 19, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, 260, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGN] * (n // 2) + ids[n // 2 :]})
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_packed_hidden_states_equal_separate(name):
    model, _ = build_tiny(name)
    exs = _examples()
    batch = collate_packed(exs)
    seg = varlen.segments_from_positions(batch["position_ids"])
    assert seg == (0, 7, 19, 23, 42, 43)
    with torch.no_grad(), varlen.registered():
        common = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        per_ex = model.base_model(**common, **{varlen.KWARG: seg}).last_hidden_state  # (1, 43, H)
        masked = model.base_model(**common).last_hidden_state
        for (s, e), ex in zip(zip(seg[:-1], seg[1:]), exs):
            alone = model.base_model(
                input_ids=torch.tensor([ex["input_ids"]]), use_cache=False
            ).last_hidden_state
            torch.testing.assert_close(per_ex[:, s:e], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(masked[:, s:e], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("varlen_attn", [True, False])
def test_packed_loss_and_grads_equal_padded(name, varlen_attn):
    model, tok = build_tiny(name)
    model = with_lora(model, name, tok)  # eval: both layouts must see the same network
    exs = _examples()
    results = []
    for batch, kw in (
        (collate(exs, 0, "causal-lm"), {}),
        (collate_packed(exs), {"varlen_attn": varlen_attn}),
    ):
        model.zero_grad(set_to_none=True)
        loss, n = compute_loss(model, batch, "causal-lm", 8, **kw)
        loss.backward()
        results.append(
            (loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
        )
    (lp, np_, gp), (lk, nk, gk) = results
    assert np_ == nk == sum(len(e["input_ids"]) - max(1, len(e["input_ids"]) // 2) for e in exs)
    torch.testing.assert_close(lk, lp, rtol=1e-5, atol=1e-5)
    assert gk.keys() == gp.keys() and gk
    for k in gp:
        torch.testing.assert_close(gk[k], gp[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("budget", [512, 700, 2048])
def test_token_budget_batches_cover_every_example_once_per_epoch(budget):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 513, (300,), generator=g).tolist()
    for epoch in (0, 1):
        batches = token_budget_batches(lengths, budget, seed=5, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(300))
        assert all(len(b) * max(lengths[i] for i in b) <= budget for b in batches)
        assert batches == token_budget_batches(lengths, budget, seed=5, epoch=epoch)


def test_packing_check_on_for_lora_off_for_prompt_tuning():
    exs = _examples((6, 6, 6))
    model, tok = build_tiny("tiny-llama")
    spec = get_method("lora")
    spec.apply(model, spec.config(name="lora", r=2), MethodContext("causal-lm", tok, "tiny-llama"))
    assert packed_rows_isolated(model, exs) == (True, "")
    assert resolve_packing(None, "causal-lm", model, exs) is True
    assert resolve_packing(False, "causal-lm", model, exs) is False

    model, tok = build_tiny("tiny-llama")
    spec = get_method("prompt")
    spec.apply(
        model, spec.config(name="prompt", num_virtual_tokens=3), MethodContext("causal-lm", tok, "tiny-llama")
    )
    logs = []
    assert resolve_packing(None, "causal-lm", model, exs, log=logs.append) is False
    assert logs and "packing off" in logs[0]
    with pytest.raises(ValueError, match="not isolated"):
        resolve_packing(True, "causal-lm", model, exs)
