"""Merge / unmerge round-trips, and merge_and_unload gives a plain HF model that reloads with transformers alone."""

from __future__ import annotations

import pytest
import torch
from _lora_helpers import inputs, randomize
from helpers import logits, tiny_model
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from sftlab.methods.lora import (
    LoraConfig,
    LoraLayer,
    SavedModule,
    add_adapter,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    unmerge_adapter,
)

AUTO = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True, "init": "pissa"}])
@pytest.mark.parametrize("name,task", [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm")])
def test_merge_matches_unmerged_and_unmerge_restores_weights(name, task, variant):
    model = tiny_model(name, task)
    add_adapter(model, "default", LoraConfig(r=4, alpha=8, **variant), task=task)
    randomize(model)
    x = inputs(task)
    ref = logits(model, x)
    w0 = {p: layer.base_layer.weight.detach().clone() for p, layer in lora_layers(model)}
    merge_adapter(model)
    assert all(layer.merged == "default" for _, layer in lora_layers(model))
    assert any(not torch.equal(layer.base_layer.weight, w0[p]) for p, layer in lora_layers(model))
    assert_close(logits(model, x), ref, rtol=1e-4, atol=1e-5)
    unmerge_adapter(model)
    for p, layer in lora_layers(model):
        assert _rel_err(layer.base_layer.weight, w0[p]) < 1e-6
    assert_close(logits(model, x), ref)


@pytest.mark.parametrize(
    "name,task,variant",
    [
        ("tiny-llama", "causal-lm", {}),
        ("tiny-gpt2", "causal-lm", {"use_dora": True}),
        ("tiny-bert", "seq-cls", {}),
        ("tiny-t5", "seq2seq", {"use_rslora": True}),
    ],
)
def test_merge_and_unload_saves_a_plain_model_that_reloads(tmp_path, name, task, variant):
    model = tiny_model(name, task)
    add_adapter(model, "default", LoraConfig(r=4, alpha=8, **variant), task=task)
    randomize(model)  # includes the seq-cls head's trained copy
    x = inputs(task)
    ref = logits(model, x)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, SavedModule)) for m in plain.modules())
    assert not hasattr(plain, "_sftlab_lora")
    assert_close(logits(plain, x), ref, rtol=1e-4, atol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = AUTO[task].from_pretrained(tmp_path).eval()
    assert_close(logits(reloaded, x), ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(
        logits(tiny_model(name, task), x), ref, atol=1e-3
    )  # the merge changed the model
