"""The fused AdamW (the default) takes the same steps as the multi-tensor one, and is really the one used."""

import torch
from torch import nn

from sftlab.train.optim import build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    m[0].requires_grad_(False)  # frozen: no state, whichever optimizer
    return m


def test_fused_adamw_matches_the_multi_tensor_one():
    runs = {}
    for fused in (True, False):
        m = _model()
        opt = build_optimizer(m, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), fused=fused)
        assert bool(opt.defaults["fused"]) is fused and bool(opt.defaults["foreach"]) is not fused
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(4, 16, generator=g)
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert not opt.state.get(m[0].weight)  # the frozen layer never got optimizer state
        runs[fused] = [p.detach().clone() for p in m.parameters()]
    start = [p.detach() for p in _model().parameters()]
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(runs[True][2], start[2])  # and it did train
