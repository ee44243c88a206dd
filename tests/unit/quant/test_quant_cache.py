"""Inference on a quantised base decodes each weight once (quant/cache.py), not once per forward: generation gives
the same tokens with and without the cache, and decodes each layer once rather than once per new token; leaving the
block, or training again, frees the kept weights; a byte budget keeps layers past it decoding per use."""

from __future__ import annotations

import pytest
import torch

from sftlab.generate import generate_ids
from sftlab.methods import get_method, lora
from sftlab.methods._base import MethodContext
from sftlab.models import load_model
from sftlab.quant import QuantLinear, QuantSpec, decoded_once, linear

LAYERS = 14  # tiny-llama: 2 blocks x (q, k, v, o, gate, up, down)


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts every NF4 decode (the function QuantLinear calls)."""
    calls = []
    real = linear.dequantize_nf4

    def counted(q, dtype):
        calls.append(1)
        return real(q, dtype)

    monkeypatch.setattr(linear, "dequantize_nf4", counted)
    return calls


def _model(adapter: bool):
    model, tok = load_model("tiny-llama", quant=QuantSpec("nf4"))
    if adapter:  # QLoRA: the fused LoRA path decodes its base too; a non-zero B so the adapter counts
        get_method("lora").apply(
            model, lora.LoraConfig(r=4, target_modules="all-linear"), MethodContext("causal-lm", "default")
        )
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.data.normal_(0, 0.05)
    return model.eval(), tok


@pytest.mark.parametrize("adapter", [False, True], ids=["nf4", "qlora"])
def test_generation_decodes_each_layer_once_and_gives_the_same_tokens(decodes, adapter):
    model, tok = _model(adapter)
    prompts = [[5, 9, 14, 20, 33], [7, 8, 9]]
    with decoded_once(model, max_bytes=0):  # nothing may be kept: every forward decodes, as before the cache
        plain = generate_ids(model, tok, prompts, 8, batch_size=2)
    per_use, longest = len(decodes), max(len(r) for r in plain)
    assert longest >= 3 and per_use >= LAYERS * longest  # a decode per layer per new token
    decodes.clear()
    assert generate_ids(model, tok, prompts, 8, batch_size=2) == plain
    assert len(decodes) == LAYERS  # once per layer for the whole generation
    assert all(m.decode_cache is None for m in model.modules() if isinstance(m, QuantLinear))  # freed after


@pytest.mark.parametrize("adapter", [False, True], ids=["nf4", "qlora"])
def test_greedy_tokens_equal_plain_generate_without_the_cache(adapter):
    model, tok = _model(adapter)
    prompts = [[5, 9, 14, 20, 33], [7, 8, 9]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plain = []
    with torch.no_grad():
        for p in prompts:  # transformers' generate on the model as it is, one prompt at a time
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, pad_token_id=pad)  # fmt: skip
            plain.append(out[0, len(p) :].tolist())
    assert generate_ids(model, tok, prompts, 10, batch_size=1) == plain
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        logits = model(ids).logits
        with decoded_once(model) as n:
            assert n == LAYERS
            assert torch.equal(model(ids).logits, logits) and torch.equal(model(ids).logits, logits)


def test_training_mode_decodes_per_use_and_frees_what_was_kept(decodes):
    model, _ = _model(adapter=False)
    ids = torch.randint(4, 250, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), decoded_once(model):
        model(ids)
        model(ids)
        assert len(decodes) == LAYERS
        caches = {id(m.decode_cache) for m in model.modules() if isinstance(m, QuantLinear)}
        (cache,) = [m.decode_cache for m in model.modules() if isinstance(m, QuantLinear)][:1]
        assert len(caches) == 1 and len(cache.store) == LAYERS
        model.train()  # training resumes: the kept weights go, forwards decode per use again
        assert not cache.store
        decodes.clear()
        model(ids)
        model(ids)
        assert len(decodes) == 2 * LAYERS and not cache.store


def test_a_byte_budget_keeps_the_layers_past_it_decoding_per_use(decodes):
    model, _ = _model(adapter=False)
    ids = torch.randint(4, 250, (1, 5), generator=torch.Generator().manual_seed(0))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    first = layers[0].out_features * layers[0].in_features * 4  # fp32 bytes of the first layer decoded
    with torch.no_grad(), decoded_once(model, max_bytes=first):
        model(ids)
        model(ids)
    assert len(decodes) == 1 + 2 * (LAYERS - 1)  # the first kept, the rest decoded in each forward
    decodes.clear()
    with torch.no_grad(), decoded_once(model, max_bytes=0):
        model(ids)
        model(ids)
    assert len(decodes) == 2 * LAYERS


def test_weight_and_to_float_are_copies_of_their_own(decodes):
    model, _ = _model(adapter=False)
    q = model.model.layers[0].mlp.down_proj
    ids = torch.randint(4, 250, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), decoded_once(model):
        before = model(ids).logits
        q.weight.mul_(0)  # a caller writing into what it read
        q.to_float().weight.data.mul_(0)
        assert torch.equal(model(ids).logits, before)
