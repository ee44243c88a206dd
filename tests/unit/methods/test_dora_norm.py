"""DoRA's row norms ||W + s·B·A||: the expanded form equals forming the matrix, tracks in-place writes to W, and the
forward allocates nothing of W's size (weight-sized holes fragment the retained heap, train/memory.py)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.pytorch_utils import Conv1D

from sftlab.methods.lora import LoraConfig, LoraLayer
from sftlab.methods.lora import layer as layer_mod
from sftlab.quant import QuantLinear

D_IN, D_OUT = 64, 96


def _base(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    lin = torch.nn.Linear(D_IN, D_OUT)
    if kind == "linear":
        return lin
    if kind == "conv1d":  # GPT-2's layout: W held as (d_in, d_out)
        conv = Conv1D(D_OUT, D_IN)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.T)
        return conv
    if kind == "bf16":
        return lin.to(torch.bfloat16)
    if kind == "nf4":
        return QuantLinear(lin, "nf4")
    if kind == "nf4-bf16":
        return QuantLinear(lin.to(torch.bfloat16), "nf4")
    raise AssertionError(kind)


def _dora(kind: str, names=("default",), r: int = 4) -> LoraLayer:
    layer = LoraLayer(_base(kind))
    for i, name in enumerate(names):
        layer.add_adapter(name, LoraConfig(r=r, alpha=2 * r, use_dora=True))
        with torch.no_grad():  # a trained-looking B (it starts at 0), different per adapter
            layer.lora_B[name].normal_(0, 0.5 + i)
    return layer


def _formed(layer: LoraLayer, name: str) -> torch.Tensor:
    """The norms as they were computed before: W + s·B·A formed in fp32 (`_work`), then its row norms."""
    w, delta = layer._work(layer.base_weight(), name)
    return torch.linalg.norm(w + delta, dim=1).to(layer.lora_A[name].dtype)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "bf16", "nf4", "nf4-bf16"])
def test_row_norms_equal_those_of_the_formed_matrix(kind, monkeypatch):
    monkeypatch.setattr(
        layer_mod, "_CHUNK", 16 * D_IN, raising=False
    )  # a half-precision W is cast in 6 chunks of 16 rows
    layer = _dora(kind)
    got, want = layer._weight_norm("default"), _formed(layer, "default")
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want, rtol=1e-6, atol=0)


def test_row_norms_of_a_cancelled_row_are_not_nan():
    layer = _dora("linear", r=1)
    s = layer.scaling["default"]
    with torch.no_grad():  # row 0 of s·B·A is -W_0: its norm is 0, which the expansion reaches by cancelling
        w0 = layer.base_weight()[0]
        layer.lora_A["default"].copy_(w0 / w0.norm())
        layer.lora_B["default"][0, 0] = -w0.norm() / s
    got = layer._weight_norm("default")
    assert not got.isnan().any()
    assert got[0] < 1e-3 * got[1:].min()
    assert_close(got[1:], _formed(layer, "default")[1:], rtol=1e-6, atol=0)


def test_row_norms_follow_in_place_writes_adapters_and_dtype():
    layer = _dora("linear", names=("a", "b"))
    for name in ("a", "b"):  # two adapters share the cached ||W_i||^2 but not their B·A part
        assert_close(layer._weight_norm(name), _formed(layer, name), rtol=1e-6, atol=0)
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)  # an in-place write (as merge/unmerge/PiSSA do)
    assert_close(layer._weight_norm("a"), _formed(layer, "a"), rtol=1e-6, atol=0)
    layer.merge("b")  # W now holds the merged weights: a forward never reads norms then, unmerge restores W
    layer.unmerge()
    assert_close(layer._weight_norm("b"), _formed(layer, "b"), rtol=1e-6, atol=0)
    x = torch.randn(3, D_IN)
    for name in ("b", "a", "b"):  # switching the active adapter switches the norm the forward divides by
        layer.active = name
        assert_close(layer(x), _reference_forward(layer, name, x), rtol=1e-5, atol=1e-6)
    layer.to(torch.float64)  # a new W (dtype): recomputed, not read from the fp32 cache
    got = layer._weight_norm("a")
    assert got.dtype == torch.float64
    assert_close(got, _formed(layer, "a"), rtol=1e-12, atol=0)


def _reference_forward(layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """DoRA as the paper writes it: m * (W + s·B·A) / ||W + s·B·A|| applied to x, plus the bias."""
    w, delta = layer._work(layer.base_weight(), name)
    v = w + delta
    m = layer.lora_magnitude_vector[name].detach()
    return x @ ((m / v.norm(dim=1))[:, None] * v).T + layer.base_layer.bias


class _BigAllocations(TorchDispatchMode):
    """Records every op whose output is a new tensor (not a view of an input) with at least `limit` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor)
                and t.numel() >= self.limit
                and t.untyped_storage().data_ptr() not in ins
            ):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kind", ["linear", "conv1d", "bf16"])
def test_dora_forward_allocates_nothing_of_the_weights_size(kind, monkeypatch):
    monkeypatch.setattr(layer_mod, "_CHUNK", 16 * D_IN, raising=False)
    layer = _dora(kind).train()
    x = torch.randn(
        2, 5, D_IN, dtype=layer.base_weight().dtype
    )  # 10 tokens: activations are far below d_out x d_in
    for _ in range(2):  # the first forward fills the cache of ||W_i||^2, the second reads it
        with _BigAllocations(D_OUT * D_IN) as mode:
            y = layer(x)
        assert mode.seen == [], mode.seen
    y.float().square().sum().backward()
    assert layer.lora_magnitude_vector["default"].grad is not None
