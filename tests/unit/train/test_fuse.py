"""Compiled RMSNorm / gated-MLP kernels: same loss and gradients as eager, only proven matches patched, undone
on exit, and a compiler failure leaves the eager model running."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config

from sftlab.data import collate
from sftlab.methods import MethodContext, get_method
from sftlab.models import build_tiny
from sftlab.recipe import train
from sftlab.train import fuse
from sftlab.train.loss import compute_loss


def _model(method: str):
    model, tok = build_tiny("tiny-llama")
    spec = get_method(method)
    kw = {"r": 4, "alpha": 8, "target_modules": "all-linear"} if method == "lora" else {}
    torch.manual_seed(0)
    spec.apply(model, spec.config(name=method, **kw), MethodContext("causal-lm", tok, "tiny-llama"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
        if n.endswith("norm.weight"):  # not all ones, so the weight's role is checked too
            with torch.no_grad():
                p.uniform_(0.5, 1.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (9, 23, 5):
        ids = torch.randint(4, 260, (n,), generator=g).tolist()
        exs.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return collate(exs, 0, "causal-lm")


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = compute_loss(model, batch, "causal-lm")
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fused_kernels_match_eager_loss_and_grads(method):
    model, batch = _model(method), _batch()
    ref_loss, ref_g = _loss_and_grads(model, batch)
    n_layers = model.config.num_hidden_layers
    with fuse.fused(model, True, log=pytest.fail) as n_patched:
        assert n_patched == 2 * n_layers + 1 + n_layers  # two norms per layer, the final norm, each MLP
        assert "forward" in model.model.norm.__dict__
        loss, g = _loss_and_grads(model, batch)
        assert all(k.fn is not k.eager for k in fuse._compiled.values())  # really the compiled kernels
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert g.keys() == ref_g.keys()
    for k in ref_g:  # norm weights (full FT) included: their gradient comes from the compiled backward
        torch.testing.assert_close(g[k], ref_g[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not any("forward" in m.__dict__ for m in model.modules())  # undone on exit


class FakeRMSNorm(torch.nn.Module):
    """Looks like an RMSNorm but scales by (1 + weight), as Gemma does: must not be patched."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return h * (1.0 + self.weight)


def test_a_lookalike_with_another_formula_is_left_alone():
    model = torch.nn.Sequential(FakeRMSNorm(16), torch.nn.Linear(16, 4))
    assert fuse.patch(model, log=pytest.fail) == []
    assert "forward" not in model[0].__dict__


def test_compiler_failure_keeps_the_eager_model(monkeypatch):
    model, batch = _model("lora"), _batch()
    ref_loss, _ = _loss_and_grads(model, batch)

    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fuse, "_compiled", {})
    monkeypatch.setattr(fuse.torch, "compile", lambda fn, **_: broken)
    said = []
    with fuse.fused(model, True, log=said.append):
        loss, _ = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss)
    assert said and "RuntimeError" in said[0]


def test_training_with_fused_kernels_follows_the_eager_run(tmp_path):
    runs = {}
    for on in (False, True):
        out = tmp_path / str(on)
        cfg = make_config(out, "tiny-llama", train={"max_steps": 3, "output_dir": str(out / "run"),
                                                   "fuse_elementwise": on})  # fmt: skip
        runs[on] = train(cfg)
    assert runs[True]["status"] == "completed"
    assert runs[True]["train_loss"] == pytest.approx(runs[False]["train_loss"], rel=1e-4)
