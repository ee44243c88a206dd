"""Prefix, P-tuning and prompt tuning train through sftlab.train.loss on every family, and reload exactly."""

from __future__ import annotations

import pytest
import torch
from _prompt_helpers import METHODS, applied, inputs, randomize, train_batch
from helpers import FAMILIES, adamw, changed_keys, snapshot, train_steps
from torch.testing import assert_close

from sftlab.methods import get_method

EXTRA = {
    "prefix": {"reparameterize": True, "prefix_hidden": 16},
    "ptuning": {"encoder": "lstm"},
    "prompt": {},
}


def _sharpen_bert_attention(model, scale: float = 30.0) -> None:
    """Content-dependent attention, as in a pretrained BERT. In the random tiny BERT every row's slot 0 (the first
    virtual token, which the pooler reads, as in PEFT) comes out nearly identical, so no classifier could learn."""
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(scale)
            layer.attention.self.key.weight.mul_(scale)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,task", FAMILIES)
def test_loss_falls_and_only_method_parameters_change(name, task, method):
    _, tuned, _, _ = applied(name, task, method)
    pooled_prompt = task == "seq-cls" and method != "prefix"
    if pooled_prompt:
        _sharpen_bert_attention(tuned)
    before = snapshot(tuned)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    own = {n for n in trainable if n.startswith(("sftlab_prefix.", "sftlab_prompt."))}
    heads = {n for n in trainable if n.startswith("classifier.")}
    assert own and trainable == own | heads and bool(heads) == (task == "seq-cls")

    lr, drop = (0.01, 0.003) if pooled_prompt else (0.1, 0.04)
    # eval mode (no dropout): every change in the loss comes from the updates
    losses = train_steps(tuned, train_batch(task), task, 12, adamw(tuned, lr))
    assert losses[-1] < losses[0] - drop, losses
    assert changed_keys(tuned, before) == trainable


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,task", FAMILIES)
def test_save_then_load_reproduces_outputs(name, task, method, tmp_path):
    spec = get_method(method)
    _, tuned, config, ctx = applied(name, task, method, **EXTRA[method])
    randomize(tuned, std=0.5)
    spec.save(tuned, config, tmp_path, ctx)
    _, fresh, _, _ = applied(name, task, method, **EXTRA[method])
    spec.load(fresh, config, tmp_path, ctx)
    batch = inputs(task)
    with torch.no_grad():
        assert_close(fresh(**batch).logits, tuned(**batch).logits, rtol=1e-5, atol=1e-5)
