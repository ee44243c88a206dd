"""Convert a llama2.c legacy export (model .bin + tokenizer .bin) into an HF Llama directory.

Why: Karpathy's tinyllamas (e.g. stories260K) are real pretrained models small enough for CPU tests, but
they ship in llama2.c's raw float32 format. After conversion they load with `from_pretrained` like any model.

Model file: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
a negative vocab_size means an untied classifier follows), then float32 arrays in llama2.c order.
Tokenizer file: int32 max_token_len, then per token (float32 score, int32 len, len bytes).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space; llama2.c exports store a plain " " instead
SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>"}  # llama2.c writes 1/2 as "\n<s>\n" and "\n</s>\n"


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool


def read_header(raw: bytes) -> Llama2cHeader:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    return Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, vocab > 0)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama2.c/Meta interleaved rotary rows -> HF half-split rows, per head.

    As in transformers' convert_llama_weights_to_hf.py permute(): (out, in) -> (nh, hd/2, 2, in)
    -> swap the pair axis to the front of each head -> (out, in).
    """
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_weights(bin_path: str | Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Parse the model file into an HF LlamaForCausalLM state dict (q/k rows permuted)."""
    raw = Path(bin_path).read_bytes()
    h = read_header(raw)
    head_dim = h.dim // h.n_heads
    kv_dim = h.n_kv_heads * head_dim
    L, D, F, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    shapes = {
        "tok_embeddings": (V, D), "rms_att": (L, D), "wq": (L, D, D), "wk": (L, kv_dim, D),
        "wv": (L, kv_dim, D), "wo": (L, D, D), "rms_ffn": (L, D), "w1": (L, F, D), "w2": (L, D, F),
        "w3": (L, F, D), "rms_final": (D,), "freq_cis_real": (h.seq_len, head_dim // 2),
        "freq_cis_imag": (h.seq_len, head_dim // 2),
    }  # fmt: skip
    if not h.shared_classifier:
        shapes["wcls"] = (V, D)
    n_floats = sum(int(np.prod(s)) for s in shapes.values())
    if len(raw) != 28 + 4 * n_floats:
        raise ValueError(
            f"{bin_path}: {len(raw)} bytes, but a llama2.c legacy export with header {h} needs {28 + 4 * n_floats}"
        )
    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    arrays: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(flat[pos : pos + n].copy()).view(shape)
        pos += n

    sd = {"model.embed_tokens.weight": arrays["tok_embeddings"], "model.norm.weight": arrays["rms_final"]}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = permute_rotary(arrays["wq"][i], h.n_heads)  # (D, D)
        sd[p + "self_attn.k_proj.weight"] = permute_rotary(arrays["wk"][i], h.n_kv_heads)  # (kv_dim, D)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]  # (F, D)
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]  # (D, F)
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]  # (F, D)
    sd["lm_head.weight"] = arrays["tok_embeddings"] if h.shared_classifier else arrays["wcls"]
    return h, sd


def hf_config(h: Llama2cHeader) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        max_position_embeddings=h.seq_len,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=h.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def read_tokenizer(tok_path: str | Path) -> list[tuple[str, float]]:
    """(piece, score) per id, with pieces in SentencePiece spelling ("▁" for space, "<s>" for BOS)."""
    raw = Path(tok_path).read_bytes()
    pos = 4  # skip max_token_len
    pieces: list[tuple[str, float]] = []
    while pos < len(raw):
        score, n = struct.unpack_from("<fi", raw, pos)
        text = raw[pos + 8 : pos + 8 + n].decode("utf-8")
        pos += 8 + n
        i = len(pieces)
        pieces.append((SPECIALS.get(i, text.replace(" ", SPIECE_SPACE)), score))
    return pieces


def bpe_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """Merges ranked by the merged piece's score, highest first (llama2.c merges the best-scoring pair).

    Same rule as transformers' SentencePieceExtractor: every split of a piece into two vocab pieces is a merge.
    """
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, (piece, score) in enumerate(pieces):
        if i in SPECIALS or (piece.startswith("<0x") and piece.endswith(">")):
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(tok_path: str | Path, model_max_length: int) -> LlamaTokenizer:
    """A byte-fallback BPE LlamaTokenizer (tokenizer.json) equivalent to llama2.c's encode/decode."""
    pieces = read_tokenizer(tok_path)
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"{tok_path}: duplicate pieces in the tokenizer")
    tok = LlamaTokenizer(vocab=vocab, merges=bpe_merges(pieces), add_bos_token=True, add_eos_token=False)
    tok.model_max_length = model_max_length
    return tok


def convert(bin_path: str | Path, tok_path: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files for a llama2.c export into out_dir."""
    out = Path(out_dir)
    h, sd = read_weights(bin_path)
    tok = build_tokenizer(tok_path, model_max_length=h.seq_len)
    if len(tok) != h.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model expects {h.vocab_size}")
    model = LlamaForCausalLM(hf_config(h))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if h.shared_classifier else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors; tied lm_head is not stored twice
    tok.save_pretrained(out)
    (out / "llama2c_source.json").write_text(
        json.dumps({"model": Path(bin_path).name, "tokenizer": Path(tok_path).name}, indent=2) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m sftlab.convert.llama2c MODEL.bin TOKENIZER.bin OUT_DIR`."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bin_path")
    ap.add_argument("tok_path")
    ap.add_argument("out_dir")
    a = ap.parse_args(argv)
    print(convert(a.bin_path, a.tok_path, a.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
