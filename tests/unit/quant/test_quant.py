"""Quantised frozen bases (QLoRA, `sftlab.quant`): the codecs' error bounds, a quantised tiny model's logits, LoRA on
top (gradients, step 0, fused path), merge to a plain HF model, resume, config refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import interrupt_after, make_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sftlab.config import build_config
from sftlab.errors import ConfigError
from sftlab.merged import merge_run
from sftlab.methods import get_method, lora
from sftlab.models import build_tiny, load_model
from sftlab.quant import (
    QuantLinear,
    QuantSpec,
    dequantize_int8,
    dequantize_model,
    dequantize_nf4,
    quantize_int8,
    quantize_nf4,
    weight_memory,
)
from sftlab.quant.codecs import NF4_CODE, SCALE_BLOCK, block_scales, nf4_error_bound
from sftlab.recipe import train
from sftlab.runs import load_run
from sftlab.train.checkpoint import list_checkpoints
from sftlab.train.loop import Trainer

QUIET = {"log": lambda *_: None}


def _weight(shape, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * scale
    w[0, :5] *= 40  # outliers, as real checkpoints have
    return w


# -- 1. codecs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 128), (10, 7)])  # 7*10 is not a multiple of the 64-block: padded
def test_nf4_roundtrip_error_is_within_the_nf4_bound(shape, double_quant):
    w = _weight(shape)
    q = quantize_nf4(w, double_quant)
    w_hat = dequantize_nf4(q)
    assert w_hat.shape == w.shape
    err = (w - w_hat).abs()
    # per element: half the widest code-book gap times the block's absmax, plus the scale's own error
    assert (err <= nf4_error_bound(w, q) + 1e-7).all()
    blocks = F.pad(w.reshape(-1), (0, (-w.numel()) % 64)).view(-1, 64)
    absmax = blocks.abs().amax(1)
    if double_quant:  # int8 scales: at most the 256-run's centred absmax / 128 off
        centred = F.pad(absmax - absmax.mean(), (0, (-absmax.numel()) % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
        bound = (centred.abs().amax(1) / 128).repeat_interleave(SCALE_BLOCK)[: absmax.numel()]
        assert ((block_scales(q) - absmax).abs() <= bound + 1e-7).all()
        assert q.scales.dtype == torch.int8
    else:
        assert torch.equal(block_scales(q), absmax)
    # and it is a real 4-bit code: every decoded value is a code value times its block's scale
    vals = F.pad(w_hat.reshape(-1), (0, (-w.numel()) % 64)).view(-1, 64) / block_scales(q)[:, None]
    code = torch.tensor(NF4_CODE)
    assert ((vals[..., None] - code).abs().amin(-1) < 1e-5).all()


def test_nf4_codes_take_half_a_byte_per_weight():
    w = _weight((256, 512))
    q = quantize_nf4(w, double_quant=True)
    bits = sum(t.numel() * t.element_size() * 8 for t in q.tensors().values()) / w.numel()
    assert 4.0 < bits < 4.2  # 4 + 8/64 + 32/(64*256) + the mean
    assert (
        sum(t.numel() * t.element_size() * 8 for t in quantize_nf4(w, False).tensors().values()) / w.numel()
        == 4.5
    )


def test_int8_roundtrip_error_is_half_a_step_per_row():
    w = _weight((33, 70))
    w_hat = dequantize_int8(quantize_int8(w))
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((w - w_hat).abs() <= step / 2 + 1e-7).all()


def test_nf4_codes_equal_torchaos():
    """torchao's NF4Tensor (torchtune's QLoRA) and ours share the code book and the double-quantisation arithmetic:
    the same codes (up to a tie at a decision boundary, rounding the other way) and the same scales."""
    nf4 = pytest.importorskip("torchao.quantization").to_nf4
    w = _weight((256, 256), seed=3)  # torchao needs numel divisible by 64*256
    ours, theirs = quantize_nf4(w, True), nf4(w, block_size=64, scaler_block_size=256)
    assert torch.equal(ours.scales, theirs.quantized_scalers)
    assert torch.equal(ours.factors, theirs.quantization_factor)
    assert (ours.codes == theirs.quantized_data).float().mean() > 0.9999
    torch.testing.assert_close(dequantize_nf4(ours), theirs.get_original_weight(), rtol=0, atol=0.05)


# -- 2. a quantised model ------------------------------------------------------------------------------------


def _ids(n=3, t=24, seed=0):
    return torch.randint(4, 250, (n, t), generator=torch.Generator().manual_seed(seed))


# Relative error of the logits (Frobenius norm of the difference over the fp32 logits' norm), tiny-llama.
LOGIT_TOL = {"nf4": 0.15, "int8": 0.01}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_tiny_llama_logits_are_close_to_fp32(kind):
    ref, _ = build_tiny("tiny-llama")
    model, _ = load_model("tiny-llama", quant=QuantSpec(kind))
    ids = _ids()
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < LOGIT_TOL[kind], rel
    assert a.argmax(-1).eq(b.argmax(-1)).float().mean() > 0.8
    quantised = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantised) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    mem = weight_memory(model)
    assert mem["quantized_params"] == sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear)
    )
    assert mem["ratio"] < (0.3 if kind == "nf4" else 0.27)


def test_dequantize_model_gives_back_plain_layers_with_the_decoded_weights():
    model, _ = load_model("tiny-llama", quant=QuantSpec("nf4"))
    q = model.model.layers[1].mlp.down_proj
    decoded = q.dequantized()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    assert dequantize_model(model) == 14
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, decoded)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_quant_linear_gradient_wrt_input_is_the_decoded_weights():
    layer = torch.nn.Linear(64, 48)
    q = QuantLinear(layer, "nf4")
    x = torch.randn(5, 7, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = q(x), F.linear(x_ref, q.dequantized(), layer.bias)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in q.parameters())


# -- 3. LoRA on a quantised base -----------------------------------------------------------------------------


def _qlora(r=4, **cfg):
    model, _ = load_model("tiny-llama", quant=QuantSpec("nf4"))
    torch.manual_seed(0)
    get_method("lora").apply(model, lora.LoraConfig(r=r, target_modules="all-linear", **cfg), _ctx())
    return model


def _ctx():
    from sftlab.methods._base import MethodContext

    return MethodContext(task="causal-lm", adapter="default")


def test_lora_on_a_quantised_base_starts_as_the_quantised_base_and_only_lora_trains():
    base, _ = load_model("tiny-llama", quant=QuantSpec("nf4"))
    model = _qlora()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0: exactly the quantised base
    assert all(isinstance(layer.base_layer, QuantLinear) for _, layer in lora.lora_layers(model))
    model.train()
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and len(with_grad) == 28
    assert all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(b.grad is None for b in model.buffers())


def test_fused_qlora_equals_the_plain_composition_and_is_used(monkeypatch):
    """The fused LoRA node on a quantised base (decode in forward and again for dX) gives the loss and gradients of
    base_layer(x) + s·B·A·x, and it is the path training takes."""
    ids = _ids()
    losses, grads = [], []
    for fused in (True, False):
        model = _qlora(fused_forward=fused)
        with torch.no_grad():
            for _, layer in lora.lora_layers(model):  # a non-zero update, so the LoRA term counts
                layer.lora_B["default"].normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)
    from sftlab.methods.lora import layer as layer_mod

    calls = []
    real = layer_mod._LoraLinear.apply
    monkeypatch.setattr(layer_mod._LoraLinear, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    _qlora()(ids)
    assert len(calls) == 14 and all(isinstance(c, QuantLinear) for c in calls)


def test_merge_adapter_on_a_quantised_base_and_unmerge_restores_it():
    model = _qlora()
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids).logits
        lora.merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-4, atol=1e-5)
        lora.unmerge_adapter(model)
        assert all(isinstance(layer.base_layer, QuantLinear) for _, layer in lora.lora_layers(model))
        assert torch.equal(model(ids).logits, unmerged)


@pytest.mark.parametrize("method", [{"name": "adapter"}, {"name": "prefix", "num_virtual_tokens": 4}])
def test_adapters_and_prefixes_train_on_a_quantised_base(tmp_path, method):
    cfg = make_config(tmp_path, method=method, train={"max_steps": 3})
    cfg.model.quantize = "nf4"
    summary = train(cfg, **QUIET)
    assert summary["status"] == "completed"
    assert summary["quantized_base"]["quantized_layers"] == 14
    assert summary["total_params"] > summary["quantized_base"]["quantized_params"]


# -- 4. config refusals --------------------------------------------------------------------------------------


def _raw(method: dict) -> dict:
    return {
        "model": {"name": "tiny-llama", "quantize": "nf4"},
        "method": method,
        "data": {"train": "x.jsonl"},
    }


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_on_a_quantised_base_are_config_errors(method):
    with pytest.raises(ConfigError, match=rf"model.quantize: nf4 .* method.name: {method} trains them"):
        build_config(_raw({"name": method}))


def test_pissa_on_a_quantised_base_is_a_config_error():
    with pytest.raises(ConfigError, match="method.init: pissa"):
        build_config(_raw({"name": "lora", "init": "pissa"}))
    model, _ = load_model("tiny-llama", quant=QuantSpec("nf4"))
    with pytest.raises(ConfigError, match="pissa"):
        lora.add_adapter(model, "p", lora.LoraConfig(init="pissa"))


def test_bad_quantize_value_names_the_key_and_choices():
    with pytest.raises(ConfigError, match=r"model.quantize.*nf4.*int8"):
        build_config(_raw({"name": "lora"}) | {"model": {"name": "tiny-llama", "quantize": "nf3"}})


# -- 5. runs: merge and resume -------------------------------------------------------------------------------


def _qlora_config(tmp: Path, **train_keys):
    cfg = make_config(
        tmp,
        method={"name": "lora", "target_modules": "all-linear"},
        train={"max_steps": 6, "save_every": 3, "output_dir": str(tmp / "run"), **train_keys},
    )
    cfg.model.quantize = "nf4"
    return cfg


def test_merge_of_a_qlora_run_reloads_with_transformers_alone_and_matches(tmp_path):
    cfg = _qlora_config(tmp_path, lr=5e-3)
    train(cfg, **QUIET)
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert set(load_file(str(final / "adapter_model.safetensors"))) == {
        k for k in load_file(str(final / "adapter_model.safetensors")) if ".lora_A." in k or ".lora_B." in k
    }
    model, _, _ = load_run(tmp_path / "run")  # quantised base + adapter, as trained
    ids = _ids()
    with torch.no_grad():
        expect = model(ids).logits
    out = merge_run(tmp_path / "run", tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers alone: no sftlab, no quantisation config
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert all(type(m) is not QuantLinear for m in plain.modules())
    with torch.no_grad():
        got = plain(ids).logits
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    base, _ = build_tiny("tiny-llama")
    with torch.no_grad():
        assert (base(ids).logits - got).abs().max() > 1e-3  # the adapter (and the NF4 rounding) are in it


def test_resume_with_a_quantised_base_is_bit_identical(tmp_path, monkeypatch):
    straight = _qlora_config(tmp_path / "a")
    train(straight, **QUIET)
    ref = load_file(str(tmp_path / "a" / "run" / "final" / "adapter_model.safetensors"))

    cfg = _qlora_config(tmp_path / "b")
    real_step = interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    ckpt = list_checkpoints(tmp_path / "b" / "run" / "checkpoints")
    assert [p.name for p in ckpt] == ["step-3"]
    saved = set(
        load_file(str(ckpt[0] / "model.safetensors")) if (ckpt[0] / "model.safetensors").exists() else {}
    )
    assert not any("q_codes" in k or "q_scales" in k for k in saved)  # the codes are rebuilt, never saved
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    assert train(cfg, resume=True, **QUIET)["steps"] == 6
    got = load_file(str(tmp_path / "b" / "run" / "final" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_dora_on_a_quantised_base_starts_at_the_base_and_trains_only_the_adapter():
    base, _ = load_model("tiny-llama", quant=QuantSpec("nf4"))
    model = _qlora(use_dora=True)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert any(".lora_magnitude_vector." in n for n in with_grad)
