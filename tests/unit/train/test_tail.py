"""The last block's MLP on supervised positions only: same loss and gradients, and it really runs on fewer rows."""

from __future__ import annotations

import pytest
import torch
from helpers import causal_lm_with_method, compute_loss, patched

from sftlab.data import collate
from sftlab.data.batching import collate_packed
from sftlab.models import enable_activation_checkpointing
from sftlab.train import tail

IGN = -100


def _examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    exs = []
    for n in (9, 23, 5, 16):
        ids = torch.randint(4, 260, (n,), generator=g).tolist()
        exs.append({"input_ids": ids, "labels": [IGN] * (n // 2) + ids[n // 2 :]})
    return exs


def _run(model, batch, trim: bool):
    seen = []  # positions the last MLP's first projection was run on
    first = next(tail.last_mlp(model.base_model).children())
    handle = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    model.zero_grad(set_to_none=True)
    try:
        with patched(model):  # backward too: under activation checkpointing it re-runs the forward
            loss, n = compute_loss(model, batch, "causal-lm", 8, trim_last_mlp=trim)
            loss.backward()
    finally:
        handle.remove()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), n, grads, seen


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert a[1] == b[1] and a[2].keys() == b[2].keys() and a[2]
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "name,method,kw",
    [
        ("tiny-llama", "lora", {"r": 4, "target_modules": "all-linear"}),
        ("tiny-llama", "full", {}),
        ("tiny-gpt2", "full", {}),
    ],
)
@pytest.mark.parametrize("packed", [True, False])
def test_trimmed_last_mlp_gives_the_same_loss_and_grads(name, method, kw, packed):
    model = causal_lm_with_method(name, method, **kw)
    exs = _examples()
    batch = collate_packed(exs) if packed else collate(exs, 0, "causal-lm")
    full, first, trimmed = _run(model, batch, False), _run(model, batch, True), _run(model, batch, True)
    _assert_same(first, full)  # the first call also probes the MLP once (one position)
    _assert_same(trimmed, full)
    seq_len = batch["input_ids"].shape[1]
    read = (batch["labels"][:, 1:] != IGN).any(0).sum().item()
    assert full[3] == [seq_len] and trimmed[3] == [read] and read < seq_len


def test_not_trimmed_under_activation_checkpointing():
    model = causal_lm_with_method("tiny-llama", "full")
    enable_activation_checkpointing(model)
    model.train()  # checkpointing only recomputes in training mode; tiny-llama has no dropout
    batch = collate_packed(_examples())
    full, trimmed = _run(model, batch, False), _run(model, batch, True)
    _assert_same(trimmed, full)
    assert all(s == batch["input_ids"].shape[1] for s in trimmed[3])  # forward and recompute: full length


def test_not_trimmed_when_virtual_tokens_shift_positions():
    model = causal_lm_with_method("tiny-llama", "prompt", num_virtual_tokens=4)
    batch = collate(_examples(), 0, "causal-lm")
    full, trimmed = _run(model, batch, False), _run(model, batch, True)
    _assert_same(trimmed, full)
    assert trimmed[3] == [batch["input_ids"].shape[1] + 4]
