"""A quantised base loaded tensor by tensor (quant/stream.py): from a safetensors directory and from a quantised
GGUF file, equal to loading the whole model and quantising it after, without the whole-model fp32 load."""

from __future__ import annotations

import pytest
import torch

from sftlab import models
from sftlab.models import build_tiny, load_model
from sftlab.quant import QuantLinear, QuantSpec, quantize_model


def _ids(vocab=250):
    return torch.randint(4, vocab, (2, 16), generator=torch.Generator().manual_seed(2))


def _whole_then_quantised(path: str, spec: QuantSpec, **kw):
    model, _ = load_model(path, **kw)  # from_pretrained, then quantise every layer
    quantize_model(model, spec)
    return model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # GPT-2: Conv1D layers, head tied to embeddings
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_streamed_safetensors_equal_whole_load_then_quantise(tmp_path, monkeypatch, name, kind):
    src, tok = build_tiny(name)
    src.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    spec = QuantSpec(kind)
    ref = _whole_then_quantised(str(tmp_path / "m"), spec)
    calls = []
    real = models._AUTO_CLASSES["causal-lm"].from_pretrained
    monkeypatch.setattr(
        models._AUTO_CLASSES["causal-lm"], "from_pretrained", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    got, _ = load_model(str(tmp_path / "m"), quant=spec)
    assert calls == []  # never loaded whole
    n_quant = sum(isinstance(m, QuantLinear) for m in got.modules())
    assert n_quant == sum(isinstance(m, QuantLinear) for m in ref.modules()) > 0
    head = got.get_output_embeddings()
    assert (head.weight is got.get_input_embeddings().weight) == bool(got.config.tie_word_embeddings)
    assert not any(p.is_meta for p in got.parameters())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_streaming_falls_back_to_a_whole_load_when_names_do_not_match(tmp_path):
    src, tok = build_tiny("tiny-llama")
    sd = {f"renamed.{k}": v.contiguous() for k, v in src.state_dict().items()}
    (tmp_path / "m").mkdir()
    src.config.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.warns(UserWarning, match="has no tensor for .*loading it whole"):
        load_model(str(tmp_path / "m"), quant=QuantSpec("nf4"))


# relative logit error vs the source model, after the file's rounding and then NF4's (embeddings in qtype too)
@pytest.mark.parametrize("qtype, tol", [("Q8_0", 0.15), ("Q4_0", 0.3)])
def test_quantised_gguf_goes_to_nf4_tensor_by_tensor(tmp_path, monkeypatch, qtype, tol):
    gguf = pytest.importorskip("gguf")
    from fixtures.gguf_writer import write_llama_gguf
    from transformers import modeling_gguf_pytorch_utils as tgguf

    src, tok = build_tiny("tiny-llama")
    path = write_llama_gguf(src, tok, tmp_path / "m.gguf", getattr(gguf.GGMLQuantizationType, qtype))
    spec = QuantSpec("nf4")
    # (the byte tokenizer has no merges for a GGUF tokenizer to rebuild: pass it, as the recipe passes its own)
    ref = _whole_then_quantised(
        str(path), spec, tokenizer=tok
    )  # transformers dequantises the whole file first
    real = tgguf.load_gguf_checkpoint

    def no_whole_dequant(*a, return_tensors=False, **k):
        assert not return_tensors, "the whole GGUF was dequantised"
        return real(*a, return_tensors=False, **k)

    monkeypatch.setattr(tgguf, "load_gguf_checkpoint", no_whole_dequant)
    got, _ = load_model(str(path), quant=spec, tokenizer=tok)
    assert sum(isinstance(m, QuantLinear) for m in got.modules()) == 14
    ids = _ids()
    with torch.no_grad():
        a, b = got(ids).logits, ref(ids).logits
    assert torch.equal(a, b)
    with torch.no_grad():  # and the file's own rounding plus NF4's stay close to the source model
        s = src(ids).logits
    assert ((a - s).norm() / s.norm()).item() < tol
