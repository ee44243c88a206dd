"""The fused LoRA linear (one autograd node, hand-written backward) gives the two-matmul reference's outputs and
gradients."""

import torch
from torch import nn

from sftlab.methods.lora.config import LoraConfig
from sftlab.methods.lora.layer import LoraLayer, _LoraLinear


def test_fused_forward_matches_reference_outputs_and_grads():
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(24, 40, bias=True).requires_grad_(False))
    layer.add_adapter("a", LoraConfig(name="lora", r=4, alpha=8, dropout=0.0, target_modules=["x"]))
    nn.init.normal_(layer.lora_B["a"])
    x = torch.randn(3, 5, 24, requires_grad=True)
    assert layer._fused_ok(x)
    out = layer(x)  # (3, 5, 40), fused path
    out.square().sum().backward()
    got = [t.grad.clone() for t in (x, layer.lora_A["a"], layer.lora_B["a"])]
    ref_x = x.detach().clone().requires_grad_(True)
    for p in (layer.lora_A["a"], layer.lora_B["a"]):
        p.grad = None
    A, B, s = layer.lora_A["a"], layer.lora_B["a"], layer.scaling["a"]
    ref = layer.base_layer(ref_x) + s * (ref_x @ A.T) @ B.T
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for g, r in zip(got, (ref_x.grad, A.grad, B.grad)):
        torch.testing.assert_close(g, r)
    assert layer.base_layer.weight.grad is None


def test_fused_path_off_for_dropout_in_training():
    layer = LoraLayer(nn.Linear(8, 8))
    layer.add_adapter("a", LoraConfig(name="lora", r=2, dropout=0.1, target_modules=["x"]))
    x = torch.randn(2, 8)
    assert not layer.train()._fused_ok(x)
    assert layer.eval()._fused_ok(x)


def test_fused_forward_switch_takes_the_reference_path_with_the_same_numbers(monkeypatch):
    torch.manual_seed(0)
    base = nn.Linear(24, 40).requires_grad_(False)
    layers = {}
    for fused in (True, False):
        layer = LoraLayer(base)
        torch.manual_seed(1)
        cfg = LoraConfig(name="lora", r=4, alpha=8, target_modules=["x"], fused_forward=fused)
        layer.add_adapter("a", cfg)
        nn.init.normal_(layer.lora_B["a"])
        layers[fused] = layer
    x = torch.randn(3, 5, 24)
    calls = []
    real = LoraLayer._fused_forward
    monkeypatch.setattr(LoraLayer, "_fused_forward", lambda self, x: calls.append(1) or real(self, x))
    on, off = layers[True](x), layers[False](x)
    assert calls == [1]  # only the layer with the switch on took the fused path
    torch.testing.assert_close(on, off)


def test_lora_linear_backward_passes_gradcheck_for_every_input():
    # float64 finite differences against the hand-written backward, base weight and bias trainable too
    torch.manual_seed(0)
    args = [
        torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        for shape in ((6, 5), (7, 5), (7,), (3, 5), (7, 3))
    ]
    assert torch.autograd.gradcheck(lambda *t: _LoraLinear.apply(*t, 1.7), args)
    args[2] = None  # no bias
    assert torch.autograd.gradcheck(
        lambda x, w, a, b: _LoraLinear.apply(x, w, None, a, b, 0.5), [args[i] for i in (0, 1, 3, 4)]
    )
