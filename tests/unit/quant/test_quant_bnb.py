"""The bitsandbytes backend (model.quant_backend: bitsandbytes): a clear error where it cannot run; on CUDA with
bitsandbytes installed, LoRA on its Linear4bit starts at the quantised base, trains only LoRA and merges."""

from __future__ import annotations

import pytest
import torch

from sftlab.errors import ModelError
from sftlab.methods import lora
from sftlab.models import load_model
from sftlab.quant import QuantSpec, dequantize_model
from sftlab.quant.bnb import is_bnb_layer, unavailable

WHY = unavailable()


@pytest.mark.skipif(WHY is None, reason="bitsandbytes and CUDA are here: the backend runs")
def test_bitsandbytes_backend_where_it_cannot_run_says_why():
    with pytest.raises(ModelError, match=r"model.quant_backend: bitsandbytes: .*quant_backend: torch"):
        load_model("tiny-llama", quant=QuantSpec("nf4", backend="bitsandbytes"))


@pytest.mark.skipif(WHY is not None, reason=f"bitsandbytes backend: {WHY}")
def test_qlora_on_bitsandbytes_linear4bit():
    model, _ = load_model("tiny-llama", quant=QuantSpec("nf4", backend="bitsandbytes"))
    model = model.cuda()
    assert sum(is_bnb_layer(m) for m in model.modules()) == 14
    ids = torch.randint(4, 250, (2, 16), device="cuda")
    with torch.no_grad():
        base = model(ids).logits
    lora.add_adapter(model, "default", lora.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in model.named_parameters() if ".lora_" in n
    }
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.05)
        model.eval()
        want = model(ids).logits
        merged = lora.merge_and_unload(model)
        assert not any(is_bnb_layer(m) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-3, atol=1e-3)
    assert dequantize_model(merged) == 0
