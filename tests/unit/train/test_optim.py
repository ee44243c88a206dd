"""The fused AdamW (the default) takes the same steps as the multi-tensor one, and is really the one used."""

import torch
from torch import nn

from sftlab.train.checkpoint import _load_optimizer, _optimizer_tensors
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


def test_resume_keeps_this_runs_optimizer_kernel():
    """A checkpoint written by the multi-tensor AdamW resumes into the fused one (and back) with its state."""
    for saved_fused in (False, True):
        m = _model()
        opt = build_optimizer(m, 1e-2, 0.0, (0.9, 0.99), fused=saved_fused)
        m(torch.randn(2, 16)).sum().backward()
        opt.step()
        tensors, meta = _optimizer_tensors(opt)
        resumed = build_optimizer(m, 1e-2, 0.0, (0.9, 0.99), fused=not saved_fused)
        _load_optimizer(resumed, tensors, meta)
        assert bool(resumed.param_groups[0]["fused"]) is (not saved_fused)
        assert bool(resumed.param_groups[0]["foreach"]) is saved_fused
        p = m[2].weight
        torch.testing.assert_close(resumed.state[p]["exp_avg"], opt.state[p]["exp_avg"])
