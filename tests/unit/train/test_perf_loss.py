"""The supervised-only, chunked, fused LM-head loss equals the naive full-logits loss, in value and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import causal_lm_with_method, compute_loss, naive_causal_lm_loss

from sftlab.data import collate
from sftlab.train import loss as loss_mod
from sftlab.train.loss import linear_cross_entropy_sum

IGN = -100


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for n in (9, 23, 5, 16):
        ids = torch.randint(4, 260, (n,), generator=g).tolist()
        exs.append({"input_ids": ids, "labels": [IGN] * (n // 3) + ids[n // 3 :]})
    return collate(exs, 0, "causal-lm")


def _grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss, n = fn(model, batch)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_fused_loss_and_grads_equal_naive(name, method, chunk):
    model = causal_lm_with_method(name, method)
    batch = _batch()
    ref_loss, ref_n, ref_g = _grads(model, naive_causal_lm_loss, batch)
    for fused in (True, False):
        loss, n, g = _grads(
            model, lambda m, b, f=fused: compute_loss(m, b, "causal-lm", chunk, fused=f), batch
        )
        assert n == ref_n
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
        assert g.keys() == ref_g.keys()
        for k in ref_g:
            torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6, msg=k)
    if method == "lora":  # frozen weights (head included) never get a gradient
        assert all("lora_" in k for k in ref_g)


def test_fused_function_direct_with_bias_and_scaled_grad():
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    b = torch.randn(30, requires_grad=True)
    y = torch.randint(0, 30, (11,))
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y, reduction="sum")
    ref_g = torch.autograd.grad(ref * 0.37, (h, w, b))
    got = linear_cross_entropy_sum(h, w, b, y, chunk_size=4)
    got_g = torch.autograd.grad(got * 0.37, (h, w, b))
    torch.testing.assert_close(got, ref)
    for a, r in zip(got_g, ref_g):
        torch.testing.assert_close(a, r)
    with torch.no_grad():  # eval: no gradient buffers, same value
        torch.testing.assert_close(linear_cross_entropy_sum(h, w, b, y, 4), ref)


def test_no_full_vocab_tensor_is_ever_built(monkeypatch):
    """Every logits tensor the head makes has at most `chunk` rows: never [tokens x vocab]."""
    model = causal_lm_with_method("tiny-llama", "full")
    batch = _batch()
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = []
    real_linear = loss_mod.F.linear

    def spy(x, w, b=None):
        out = real_linear(x, w, b)
        if w.shape[0] == vocab:
            rows.append(out.shape[0])
        return out

    real_into = loss_mod._logits_into

    def spy_into(hc, w, b, buf_rows, dnn=False):
        out = real_into(hc, w, b, buf_rows, dnn)
        rows.append(out.shape[0])
        assert out.untyped_storage().nbytes() <= 8 * vocab * 4  # the reused buffer holds one chunk
        return out

    monkeypatch.setattr(loss_mod.F, "linear", spy)
    monkeypatch.setattr(loss_mod, "_logits_into", spy_into)
    loss, n = compute_loss(model, batch, "causal-lm", chunk_size=8)
    loss.backward()
    assert n > 8 and rows and max(rows) <= 8 and sum(rows) == n


def test_confidently_wrong_rows_keep_an_exact_loss():
    """A target whose softmax probability underflows fp32 (loss ~ 200 nats) is rescored from its logits."""
    torch.manual_seed(0)
    h = torch.randn(6, 8, dtype=torch.float64).float()
    w = torch.randn(30, 8)
    y = torch.randint(0, 30, (6,))
    w[y[2]] = -80.0 * h[2] / h[2].norm()  # row 2 target logit ~ -80 |h|: p far below fp32 range
    h.requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h @ w.T, y, reduction="none")
    assert ref[2] > 110  # e^-110: a probability fp32 cannot hold
    got = linear_cross_entropy_sum(h, w, None, y, chunk_size=4)
    torch.testing.assert_close(got, ref.sum())
    (gh,) = torch.autograd.grad(got, (h,))
    (rh,) = torch.autograd.grad(ref.sum(), (h,))
    torch.testing.assert_close(gh, rh)


def test_logits_buffer_is_reused_and_reuse_keeps_every_call_exact():
    """One (chunk, V) buffer per head weight serves every call; a later, smaller call overwrites it and both
    calls' losses and gradients still equal the reference; the buffer goes with the weight."""
    torch.manual_seed(0)
    w, b = torch.randn(50, 8), torch.randn(50)
    ptrs = []
    real_into = loss_mod._logits_into
    for n in (11, 5, 11):
        h = torch.randn(n, 8, requires_grad=True)
        y = torch.randint(0, 50, (n,))
        ref_h = h.detach().clone().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(ref_h @ w.T + b, y, reduction="sum")
        ref.backward()
        got = linear_cross_entropy_sum(h, w, b, y, chunk_size=4)
        got.backward()
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(h.grad, ref_h.grad)
        ptrs.append(real_into(h[:1].detach(), w, b, 4).data_ptr())
    assert len(set(ptrs)) == 1  # the same buffer every time
    key = id(w)
    assert key in loss_mod._buffers()
    del w
    assert key not in loss_mod._buffers()


def test_fused_loss_refuses_a_second_backward_with_retained_graph():
    """Its stored gradients are scaled in place, so a second backward would be wrong: it says so instead."""
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(h, w, None, torch.randint(0, 30, (5,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


def test_logits_buffers_are_per_thread():
    """Two threads scoring with one head never write into the same buffer."""
    import threading

    w = torch.randn(40, 8)
    tables = {}

    def score(name):
        h, y = torch.randn(6, 8), torch.randint(0, 40, (6,))
        got = linear_cross_entropy_sum(h, w, None, y, chunk_size=4)
        torch.testing.assert_close(got, torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum"))
        tables[name] = loss_mod._buffers()[id(w)][1]

    t = threading.Thread(target=score, args=("thread",))
    t.start()
    t.join()
    score("main")
    assert tables["thread"].data_ptr() != tables["main"].data_ptr()


def test_no_buffer_is_kept_above_the_size_cap(monkeypatch):
    """A big vocabulary's chunk (e.g. 512 x 152k fp32 = 311 MB) is not held for the model's life."""
    monkeypatch.setattr(
        loss_mod, "KEEP_MAX_BYTES", 4 * 40 * 4 - 1
    )  # just under one 4-row chunk of a 40 vocab
    w = torch.randn(40, 8)
    h, y = torch.randn(6, 8), torch.randint(0, 40, (6,))
    got = linear_cross_entropy_sum(h, w, None, y, chunk_size=4)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum"))
    assert id(w) not in loss_mod._buffers()
