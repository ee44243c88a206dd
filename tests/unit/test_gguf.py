"""GGUF model path, offline: a tiny Llama written as GGUF must load through `load_model(".gguf")` to the same
logits and tokenization as its source, and must save/reload as a plain HF dir (the quantized-flag fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from fixtures.gguf_writer import permute_to_gguf, write_llama_gguf  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from sftlab.models import SPECIAL_TOKENS, load_model, tiny_config  # noqa: E402

# Byte-level BPE with a few merges, so the GGUF tokenizer's merge handling is exercised (not just bytes).
MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("Ġ", "c")]
TEXTS = ["the cat", " the hether, Zürich! 12345", "<s>hi</s>", "tab\tnew\nline  two  spaces"]


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token=SPECIAL_TOKENS["unk"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Path]:
    tok = _bpe_tokenizer()
    cfg = tiny_config(
        "tiny-llama", len(tok), "causal-lm"
    )  # hidden 64, 4 heads, 2 kv heads (GQA), untied head
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg).eval()
    path = write_llama_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf")
    return model, tok, path


def _ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab_size, (2, 12), generator=g)  # [B=2, T=12]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits  # [B, T, V]


def test_file_stores_llama_cpp_layout(source):
    """The fixture really writes what llama.cpp writes: q/k rows interleaved, so loading must un-permute."""
    model, _, path = source
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    q_hf = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    q_file = tensors["blk.0.attn_q.weight"].data.reshape(q_hf.shape)
    assert not (q_file == q_hf).all()
    assert (q_file == permute_to_gguf(q_hf, model.config.num_attention_heads)).all()
    assert "output.weight" in tensors  # untied head stays untied


def test_load_gguf_matches_source_logits(source):
    model, _, path = source
    loaded, _ = load_model(str(path))
    assert isinstance(loaded, LlamaForCausalLM)
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    assert loaded.config.tie_word_embeddings is False
    assert next(loaded.parameters()).dtype == torch.float32
    # Weight-level check first (pinpoints a permutation bug), then the logits the user sees.
    for name in ("q_proj", "k_proj"):
        torch.testing.assert_close(
            getattr(loaded.model.layers[1].self_attn, name).weight,
            getattr(model.model.layers[1].self_attn, name).weight,
        )
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))


def test_gguf_tokenizer_matches_source(source):
    _, tok, path = source
    _, gtok = load_model(str(path))
    for text in TEXTS:
        ids = tok(text).input_ids
        assert gtok(text).input_ids == ids, text
        assert gtok.decode(ids) == tok.decode(ids) == text
    assert gtok(" the").input_ids == [tok.convert_tokens_to_ids("Ġthe")]  # merges applied, not bytes
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(gtok, attr) == getattr(tok, attr), attr
    assert gtok.decode(gtok("<s>hi</s>").input_ids, skip_special_tokens=True) == "hi"


def test_save_pretrained_roundtrip(source, tmp_path):
    model, tok, path = source
    loaded, gtok = load_model(str(path))
    assert not getattr(loaded, "is_quantized", False)
    out = tmp_path / "hf"
    loaded.save_pretrained(out)  # raises "quantized with gguf and is not serializable" without the fix
    gtok.save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded, rtok = load_model(str(out))
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(loaded, ids), rtol=0, atol=0)  # bit-identical
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids))
    for text in TEXTS:
        assert rtok(text).input_ids == tok(text).input_ids, text
