"""Bottleneck adapters: identity at step 0, training touches only adapters, parameter counts, reference forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, adamw, changed_keys, logits, snapshot, tiny_model, train_steps

from sftlab.methods import MethodContext, get_method
from sftlab.methods._targets import count_parameters
from sftlab.methods.adapter import AdapterConfig, adapter_param_count, adapter_state_dict


def fixed_batch(task: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if task == "seq-cls":
        ids = torch.randint(4, 260, (4, 10), generator=g)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([0, 1, 1, 0]),
        }
    ids = torch.randint(4, 260, (2, 12), generator=g)
    if task == "seq2seq":
        labels = torch.randint(4, 260, (2, 6), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt with no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def apply_adapter(model, task: str, **kw) -> AdapterConfig:
    spec = get_method("adapter")
    cfg = spec.config(**kw)
    spec.apply(model, cfg, MethodContext(task=task, base_model_name="tiny"))
    return cfg


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("name,task", FAMILIES)
def test_zero_up_init_keeps_base_outputs(name, task, placement):
    model, batch = tiny_model(name, task), fixed_batch(task)
    ref = logits(model, batch)
    apply_adapter(model, task, placement=placement, layer_norm=True, activation="gelu")
    assert count_parameters(model)[0] > 0
    torch.testing.assert_close(logits(model, batch), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name,task", FAMILIES)
def test_training_changes_only_adapter_tensors_and_loss_falls(name, task):
    model, batch = tiny_model(name, task), fixed_batch(task)
    apply_adapter(model, task, placement="houlsby", bottleneck_size=8)
    before = snapshot(model)
    losses = train_steps(model, batch, task, 8, adamw(model, 3e-2))
    # Causal LMs plateau near 5.3 nats: the frozen random LM head of a tiny model bounds the logit range.
    assert losses[-1] < losses[0] - 0.2, losses
    changed = changed_keys(model, before)
    assert changed, "nothing trained"
    assert all(".adapters.default." in k or ".modules_to_save.default." in k for k in changed), sorted(
        changed
    )
    ups = [k for k in changed if k.endswith("up.weight")]
    assert ups, "W_up never moved"
    if task == "seq-cls":  # the fresh head trains as a per-adapter copy; the original head stays frozen
        assert "classifier.modules_to_save.default.weight" in changed


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("placement,n_points", [("houlsby", 4), ("pfeiffer", 2)])
def test_trainable_count_matches_formula(placement, n_points, layer_norm):
    model = tiny_model("tiny-llama", "causal-lm")
    apply_adapter(
        model, "causal-lm", placement=placement, layer_norm=layer_norm
    )  # reduction 16: m = 64/16 = 4
    expected = adapter_param_count(64, 4, n_points, layer_norm)
    assert count_parameters(model)[0] == expected
    assert sum(p.numel() for p in adapter_state_dict(model, "default").values()) == expected


def test_trainable_count_t5_and_bert_head():
    t5 = tiny_model("tiny-t5", "seq2seq")
    apply_adapter(t5, "seq2seq", placement="houlsby", bottleneck_size=8)
    # encoder: 2 blocks x (self-attn + FFN); decoder: 2 blocks x (self-attn + cross-attn + FFN)
    assert count_parameters(t5)[0] == adapter_param_count(64, 8, 10, False)
    bert = tiny_model("tiny-bert", "seq-cls")
    apply_adapter(bert, "seq-cls", placement="pfeiffer", reduction_factor=8)
    assert count_parameters(bert)[0] == adapter_param_count(64, 8, 2, False) + (64 * 2 + 2)


def test_config_rejects_both_sizes():
    with pytest.raises(ValueError, match="reduction_factor or bottleneck_size"):
        AdapterConfig(reduction_factor=8, bottleneck_size=4)


@pytest.mark.parametrize("activation,layer_norm", [("relu", False), ("silu", True)])
def test_nonzero_adapter_matches_reference_hooks(activation, layer_norm):
    """h_out = h + W_up·act(W_down·LN(h)) at o_proj and down_proj outputs, written independently as hooks."""
    model, ref_model = tiny_model("tiny-llama", "causal-lm"), tiny_model("tiny-llama", "causal-lm")
    batch = fixed_batch("causal-lm")
    apply_adapter(model, "causal-lm", placement="houlsby", activation=activation, layer_norm=layer_norm)
    params = adapter_state_dict(model, "default")
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.5)
    act = {"relu": F.relu, "silu": F.silu}[activation]

    def hook_for(prefix: str):
        def hook(_mod, _inp, h):
            x = (
                F.layer_norm(h, (64,), params[prefix + "norm.weight"], params[prefix + "norm.bias"])
                if layer_norm
                else h
            )
            down = F.linear(x, params[prefix + "down.weight"], params[prefix + "down.bias"])
            return h + F.linear(act(down), params[prefix + "up.weight"], params[prefix + "up.bias"])

        return hook

    points = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    for pt in points:
        ref_model.get_submodule(pt).register_forward_hook(hook_for(pt + ".adapter."))
    assert {k.split(".adapter.")[0] for k in params} == set(points)
    out, ref = logits(model, batch), logits(ref_model, batch)
    torch.testing.assert_close(out, ref)
    assert (
        out - logits(tiny_model("tiny-llama", "causal-lm"), batch)
    ).abs().max() > 1e-2  # the adapter does act
