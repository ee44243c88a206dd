"""oneDNN GEMMs (sftlab/gemm.py): same numbers as torch's BLAS, really used where switched on, never elsewhere."""

from __future__ import annotations

import pytest
import torch
from helpers import causal_lm_with_method, compute_loss, make_config

from sftlab import gemm
from sftlab.recipe import prepare
from sftlab.train import loss as loss_mod
from sftlab.train.loop import Trainer
from sftlab.train.loss import linear_cross_entropy_sum

pytestmark = pytest.mark.skipif(not gemm.available(), reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def _any_isa(monkeypatch):
    """The tests run the oneDNN path on any CPU that has it (the default takes it only with AVX-512)."""
    monkeypatch.setattr(gemm, "pays", lambda: True)


def test_default_only_where_torch_runs_avx512(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with gemm.enabled(True):
        assert not gemm.active()
    model = causal_lm_with_method("tiny-llama", "full")
    with gemm.linears(model):
        assert all("forward" not in m.__dict__ for m in model.modules())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with gemm.enabled(True):
        assert gemm.active()


@pytest.fixture
def calls(monkeypatch):
    """Counts oneDNN GEMMs by the shape of their weight, sorted (forward W and backward's W^T count alike)."""
    seen: list[tuple[int, ...]] = []
    real = gemm._dnn

    def counted(x, w, b):
        seen.append(tuple(sorted(w.shape)))
        return real(x, w, b)

    monkeypatch.setattr(gemm, "_dnn", counted)
    return seen


def test_linear_and_mm_equal_torch_and_follow_the_switch(calls):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 24, generator=g), torch.randn(50, 24, generator=g), torch.randn(50, generator=g)
    dy = torch.randn(37, 50, generator=g)
    assert not gemm.active()
    torch.testing.assert_close(gemm.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert calls == []  # outside the context: torch
    with gemm.enabled(True):
        assert gemm.active()
        torch.testing.assert_close(gemm.linear(x, w, b), torch.nn.functional.linear(x, w, b))
        torch.testing.assert_close(gemm.mm(dy, w), dy @ w)  # b as a transposed view
        assert len(calls) == 2
        gemm.mm(dy.double(), w.double())  # not fp32: torch
        assert len(calls) == 2
        with gemm.enabled(False):
            assert not gemm.active()
            gemm.linear(x, w, b)
        assert gemm.active() and len(calls) == 2
    assert not gemm.active()


def test_probe_refuses_a_reduced_precision_onednn(monkeypatch):
    real = gemm._dnn
    monkeypatch.setattr(gemm, "_dnn", lambda x, w, b: real(x, w, b).bfloat16().float())  # bf16 math
    monkeypatch.setattr(gemm, "_probe", None)
    assert not gemm.available()
    with gemm.enabled(True):
        assert not gemm.active()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 260, (2, 21), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_and_grads(model, dnn: bool):
    model.zero_grad(set_to_none=True)
    loss, _ = compute_loss(model, _batch(), "causal-lm", onednn_gemm=dnn)  # backward keeps forward's choice
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_pass_equals_torch_blas_and_uses_onednn(method, calls):
    model = causal_lm_with_method("tiny-llama", method)
    ref_loss, ref_g = _loss_and_grads(model, False)
    assert calls == []
    loss, g = _loss_and_grads(model, True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert g.keys() == ref_g.keys()
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-6, msg=k)
    cfg, layers = model.config, model.config.num_hidden_layers
    head = tuple(sorted(model.get_output_embeddings().weight.shape))
    mlp = tuple(sorted((cfg.intermediate_size, cfg.hidden_size)))
    square = (cfg.hidden_size, cfg.hidden_size)  # q_proj and o_proj
    # forward and input gradient of every projection, and the head's logits and dH, went through oneDNN
    assert calls.count(head) == 2
    assert calls.count(mlp) == 6 * layers  # gate, up, down
    # LoRA: the first layer's q_proj needs no input gradient (frozen embeddings below it)
    assert calls.count(square) == 4 * layers - (method == "lora")
    # the swap is undone: every Linear runs its class's forward again
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_linears_leaves_head_and_hooked_layers_alone_and_restores_on_error():
    model = causal_lm_with_method("tiny-llama", "full")
    hooked = model.model.layers[0].mlp.down_proj
    hooked.register_forward_hook(lambda *_: None)
    with pytest.raises(KeyError), gemm.linears(model):
        swapped = [m for m in model.modules() if "forward" in m.__dict__]
        assert model.model.layers[0].self_attn.q_proj in swapped
        assert model.get_output_embeddings() not in swapped and hooked not in swapped
        raise KeyError
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_fused_loss_chunks_under_the_heap_ceiling_with_onednn(monkeypatch, calls):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(30, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 30, (10,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum")
    ref_g = torch.autograd.grad(ref * 0.5, (h, w))
    monkeypatch.setattr(loss_mod, "DNN_LOGITS_MAX_BYTES", 3 * 30 * 4)  # 3 rows of logits per chunk
    with gemm.enabled(True):
        got = linear_cross_entropy_sum(h, w, None, y, chunk_size=512)
    got_g = torch.autograd.grad(got * 0.5, (h, w))
    torch.testing.assert_close(got, ref)
    for a, r in zip(got_g, ref_g):
        torch.testing.assert_close(a, r)
    assert len(calls) == 2 * 4  # ceil(10 / 3) chunks, logits and dH each


@pytest.mark.parametrize("on", [True, False])
def test_trainer_switch(tmp_path, on, calls):
    cfg = make_config(
        tmp_path, "tiny-llama", method={"name": "lora"}, train={"max_steps": 2}, perf={"onednn_gemm": on}
    )
    model, _tok, data, _ = prepare(cfg, log=lambda *_: None)
    t = Trainer(model=model, cfg=cfg.train, task="causal-lm", train_examples=data.examples, pad_id=0,
                run_dir=tmp_path, log=lambda *_: None, perf=cfg.perf)  # fmt: skip
    t.fit()
    assert (len(calls) > 0) is on
    assert not gemm.active()


def test_a_frozen_linear_keeps_no_input_for_backward():
    """`_Linear` keeps x only for the weight gradient: a frozen layer's input is not held until backward (it was,
    for every frozen linear of an adapter/prefix/prompt run: ~30% more peak memory on a 21M Llama)."""
    lin = torch.nn.Linear(24, 50)
    x = torch.randn(37, 24, requires_grad=True)
    for trains in (True, False):
        lin.weight.requires_grad_(trains)
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, kept=kept: kept.append(t) or t, lambda t: t):
            with gemm.enabled(True), gemm.linears(torch.nn.Sequential(lin)):
                y = lin(x)
        assert any(t.data_ptr() == x.data_ptr() for t in kept) is trains
        y.sum().backward()
        torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(37, 24))
        x.grad = None
