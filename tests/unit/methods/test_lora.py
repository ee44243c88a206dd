"""LoRA core: step-0 identity, what trains, the fast path, targeting errors, config and parameter counts."""

from __future__ import annotations

import pytest
import torch
from _lora_helpers import inputs, train_batch
from helpers import FAMILIES, adamw, changed_keys, logits, snapshot, tiny_model, train_steps
from pydantic import ValidationError
from torch.testing import assert_close

from sftlab.methods import MethodContext, get_method
from sftlab.methods._targets import count_parameters
from sftlab.methods.lora import LoraConfig, LoraLayer, add_adapter, lora_config_from_peft, lora_layers

LORA = get_method("lora")
INITS = {
    "default": {},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "dora": {"use_dora": True},
}


@pytest.mark.parametrize("init", list(INITS))
@pytest.mark.parametrize("name,task", FAMILIES)
def test_step0_logits_equal_base(name, task, init):
    base, model = tiny_model(name, task), tiny_model(name, task)
    LORA.apply(model, LoraConfig(r=4, **INITS[init]), MethodContext(task=task))
    assert len(list(lora_layers(model))) > 0
    x = inputs(task)
    if init == "pissa":  # W_res + s·B·A == W up to fp32 rounding
        assert_close(logits(model, x), logits(base, x))
    else:  # B == 0 (DoRA: m == ||W||), so the update is exactly zero
        assert torch.equal(logits(model, x), logits(base, x))


@pytest.mark.parametrize("name,task", FAMILIES)
def test_training_changes_only_adapter_params_and_loss_falls(name, task):
    model = tiny_model(name, task)
    LORA.apply(model, LoraConfig(r=4, alpha=8, use_dora=(name == "tiny-gpt2")), MethodContext(task=task))
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (".modules_to_save." in n) for n in trainable)
    if task == "seq-cls":
        assert any("classifier.modules_to_save.default" in n for n in trainable)  # the fresh head trains
    opt = adamw(model, 1e-2)
    model.train()
    losses = train_steps(model, train_batch(task), task, 6, opt)
    assert losses[-1] < losses[0] - 0.05, losses
    changed = changed_keys(model, before)
    assert changed <= trainable
    assert any("lora_B" in n for n in changed)
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    assert all(p.grad is None for p in frozen)  # never set: no gradient ever reached the frozen base
    assert not any(id(p) in opt.state for p in frozen)  # no optimizer state for the frozen base


def test_fast_path_no_input_copy_and_no_BA_product():
    """dropout 0: autograd keeps x itself (no copy) and nothing of shape (d_out, d_in) is built."""
    layer = LoraLayer(torch.nn.Linear(32, 48))
    layer.add_adapter("default", LoraConfig(r=4))
    layer.base_layer.requires_grad_(False)
    layer.train()
    x = torch.randn(2, 5, 32)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    assert layer.base_layer.weight.grad is None and layer.lora_B["default"].grad is not None
    inputs_like = [t for t in saved if t.shape[-1] == 32 and t.numel() == x.numel()]
    assert inputs_like and all(t.data_ptr() == x.data_ptr() for t in inputs_like)
    w = layer.base_layer.weight  # kept by reference for dX; never a new (d_out, d_in) tensor such as B·A
    assert not any(tuple(t.shape) in ((48, 32), (32, 48)) and t.data_ptr() != w.data_ptr() for t in saved)


def test_dropout_applies_only_in_training():
    layer = LoraLayer(torch.nn.Linear(16, 16))
    layer.add_adapter("default", LoraConfig(r=2, dropout=0.5))
    torch.nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_conv1d_update_matches_transposed_weight():
    """GPT-2's Conv1D stores W as (d_in, d_out); LoRA must act as on the equivalent Linear."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 16)  # nf=d_out, nx=d_in
    lin = torch.nn.Linear(16, 24)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    a, b = LoraLayer(conv), LoraLayer(lin)
    for layer in (a, b):
        torch.manual_seed(0)
        layer.add_adapter("default", LoraConfig(r=3, use_dora=True))
        torch.nn.init.normal_(layer.lora_B["default"])
    assert a.fan_in_fan_out and a.in_features == 16 and a.out_features == 24
    x = torch.randn(2, 16)
    assert_close(a(x), b(x))


def test_unsupported_target_type_lists_targetable_names():
    model = tiny_model("tiny-llama", "causal-lm")
    with pytest.raises(ValueError, match="Embedding") as e:
        add_adapter(model, "default", LoraConfig(target_modules=["embed_tokens"]))
    for name in ("q_proj", "v_proj", "gate_proj", "down_proj"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        add_adapter(model, "x", LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="no module named 'wte'"):
        add_adapter(model, "y", LoraConfig(modules_to_save=["wte"]))


def test_target_modules_regex_and_all_linear_exclude_head():
    model = tiny_model("tiny-llama", "causal-lm")
    add_adapter(model, "re", LoraConfig(r=2, target_modules=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert sorted(p for p, _ in lora_layers(model)) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ]
    model = tiny_model("tiny-gpt2", "causal-lm")
    add_adapter(model, "all", LoraConfig(r=2, target_modules="all-linear"))
    paths = [p for p, _ in lora_layers(model)]
    assert "lm_head" not in paths and len(paths) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block


def test_config_validates():
    assert LORA.config is LoraConfig
    with pytest.raises(ValidationError):
        LoraConfig(r=0)
    with pytest.raises(ValidationError):
        LoraConfig(rank=8)  # unknown key
    with pytest.raises(ValidationError):
        LoraConfig(init="olora")
    assert LoraConfig(r=16, alpha=32).scaling == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_lora_config_from_peft():
    cfg = lora_config_from_peft(
        {
            "peft_type": "LORA",
            "r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
            "target_modules": ["v_proj", "q_proj"],
            "use_dora": True,
            "init_lora_weights": True,
            "bias": "none",
            "modules_to_save": None,
        }
    )
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.use_dora) == (
        4,
        8.0,
        0.1,
        ["q_proj", "v_proj"],
        True,
    )
    with pytest.raises(ValueError, match="rank_pattern"):
        lora_config_from_peft({"r": 4, "rank_pattern": {"q_proj": 8}})
    with pytest.raises(ValueError, match="bias"):
        lora_config_from_peft({"r": 4, "bias": "all"})


def test_trainable_count_matches_formula_and_adapter_is_small(tmp_path):
    """tiny-llama, r=8 on q_proj, v_proj: sum over modules of r*(d_in + d_out)."""
    model = tiny_model("tiny-llama", "causal-lm")
    LORA.apply(model, LoraConfig(r=8), MethodContext(task="causal-lm"))
    c = model.config
    d_kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 8 * (c.hidden_size + c.hidden_size) + 8 * (c.hidden_size + d_kv)  # q: 64->64, v: 64->32
    trainable, _ = count_parameters(model)
    assert trainable == c.num_hidden_layers * per_layer == 3584
    LORA.save(model, LoraConfig(r=8), tmp_path, MethodContext(task="causal-lm", base_model_name="tiny-llama"))
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < 4 * trainable + 2048  # fp32 tensors + a small header: kilobytes, no base weights
