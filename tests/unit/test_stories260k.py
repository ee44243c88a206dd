"""llama2.c -> HF conversion: parity with a direct re-implementation of llama2.c's forward and encoder.

Synthetic exports (random weights, tied and untied) run on a fresh clone; the real stories260K checks
(greedy story from BOS, loss on TinyStories) use ../shared and skip without it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sftlab.convert.llama2c import convert, permute_rotary
from sftlab.models import load_model

EXPECTED_STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."  # llama2.c's own expected greedy output for stories260K (first two sentences)


# ---- a reference llama2.c, written from run.c's semantics (interleaved rotary, raw weight layout) ----


def read_llama2c(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    raw = path.read_bytes()
    D, Fh, L, nh, nkv, V, T = struct.unpack("<7i", raw[:28])
    hs = D // nh
    names = [("emb", (abs(V), D)), ("rms_att", (L, D)), ("wq", (L, D, D)), ("wk", (L, nkv * hs, D)),
             ("wv", (L, nkv * hs, D)), ("wo", (L, D, D)), ("rms_ffn", (L, D)), ("w1", (L, Fh, D)),
             ("w2", (L, D, Fh)), ("w3", (L, Fh, D)), ("rms_final", (D,)), ("fr", (T, hs // 2)),
             ("fi", (T, hs // 2))] + ([("wcls", (abs(V), D))] if V < 0 else [])  # fmt: skip
    flat, pos, w = np.frombuffer(raw, "<f4", offset=28), 0, {}
    for name, shape in names:
        n = math.prod(shape)
        w[name] = torch.from_numpy(flat[pos : pos + n].copy()).view(shape)
        pos += n
    w.setdefault("wcls", w["emb"])
    return {"D": D, "L": L, "nh": nh, "nkv": nkv, "hs": hs}, w


def llama2c_logits(h: dict[str, int], w: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """(T, V) logits computed like run.c: rotary on adjacent pairs (2i, 2i+1), GQA by head // kv_mul."""

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    def rope(v, n_heads):  # v: (T, n_heads*hs), rotate pairs (2i, 2i+1) within each head
        T = v.shape[0]
        v = v.view(T, n_heads, h["hs"] // 2, 2)
        freq = 1.0 / 10000.0 ** (torch.arange(0, h["hs"], 2, dtype=torch.float64) / h["hs"])
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None]  # (T, hs/2)
        c, s = ang.cos().float()[:, None], ang.sin().float()[:, None]
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(T, -1)

    x = w["emb"][tokens]  # (T, D)
    T, hs, kv_mul = len(tokens), h["hs"], h["nh"] // h["nkv"]
    causal = torch.ones(T, T).tril().bool()
    for layer in range(h["L"]):
        xb = rms(x, w["rms_att"][layer])
        q = rope(xb @ w["wq"][layer].T, h["nh"]).view(T, h["nh"], hs)
        k = rope(xb @ w["wk"][layer].T, h["nkv"]).view(T, h["nkv"], hs)
        v = (xb @ w["wv"][layer].T).view(T, h["nkv"], hs)
        heads = []
        for hd in range(h["nh"]):
            att = (q[:, hd] @ k[:, hd // kv_mul].T) / math.sqrt(hs)  # (T, T)
            heads.append(att.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, hd // kv_mul])
        x = x + torch.cat(heads, -1) @ w["wo"][layer].T
        xb = rms(x, w["rms_ffn"][layer])
        x = x + (F.silu(xb @ w["w1"][layer].T) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


def llama2c_encode(tok_path: Path, text: str) -> list[int]:
    """run.c encode(): BOS, dummy " ", code points (else UTF-8 byte fallback), then best-score merges."""
    raw, pos, pieces, scores = tok_path.read_bytes(), 4, [], []
    while pos < len(raw):
        score, n = struct.unpack_from("<fi", raw, pos)
        pieces.append(raw[pos + 8 : pos + 8 + n].decode())
        scores.append(score)
        pos += 8 + n
    lookup = {p: i for i, p in enumerate(pieces)}
    ids = [lookup[" "]] if text else []
    for ch in text:
        ids += [lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode()]
    while True:
        best = (-1e10, -1, -1)
        for i in range(len(ids) - 1):
            j = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if j is not None and scores[j] > best[0]:
                best = (scores[j], j, i)
        if best[2] < 0:
            return [1, *ids]
        ids[best[2] : best[2] + 2] = [best[1]]


# ---- synthetic exports: random weights, tiny tokenizer ----


def write_llama2c(path: Path, tied: bool, seed: int = 0) -> None:
    D, Fh, L, nh, nkv, T = 16, 24, 2, 4, 2, 32
    V = 259 + len(SYNTH_PIECES)
    hs = D // nh
    g = torch.Generator().manual_seed(seed)
    sizes = [V * D, L * D, L * D * D, L * nkv * hs * D, L * nkv * hs * D, L * D * D, L * D, L * Fh * D,
             L * D * Fh, L * Fh * D, D, T * hs // 2, T * hs // 2] + ([] if tied else [V * D])  # fmt: skip
    arrays = [torch.randn(n, generator=g) * 0.5 for n in sizes]
    arrays[1] += 1.0  # norm gains near 1, like a trained model
    arrays[6] += 1.0
    arrays[10] += 1.0
    header = struct.pack("<7i", D, Fh, L, nh, nkv, V if tied else -V, T)
    path.write_bytes(header + torch.cat(arrays).numpy().astype("<f4").tobytes())


SYNTH_PIECES = [(" ", -1.0), ("a", -2.0), ("b", -2.0), ("c", -3.0), ("ab", -1.5), (" a", -0.5), (" ab", -0.2),
                ("ba", -1.0), ("ca", -2.5), ("é", -4.0), (" abc", -0.1), ("abc", -1.2)]  # fmt: skip


def write_tok(path: Path) -> None:
    entries = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)]
    entries += [(f"<0x{b:02X}>", 0.0) for b in range(256)] + SYNTH_PIECES
    out = struct.pack("<i", max(len(p.encode()) for p, _ in entries))
    for piece, score in entries:
        out += struct.pack("<fi", score, len(piece.encode())) + piece.encode()
    path.write_bytes(out)


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_export_matches_llama2c_forward(tmp_path, tied):
    write_llama2c(tmp_path / "m.bin", tied)
    write_tok(tmp_path / "t.bin")
    out = convert(tmp_path / "m.bin", tmp_path / "t.bin", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["num_key_value_heads"] == 2
    model, tok = load_model(str(out))
    text = "abc bab cab é! ab"
    ids = tok(text).input_ids
    assert ids == llama2c_encode(tmp_path / "t.bin", text)
    assert tok.decode(ids, skip_special_tokens=True) == text
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]  # (T, V)
    torch.testing.assert_close(
        got, llama2c_logits(*read_llama2c(tmp_path / "m.bin"), ids), rtol=1e-4, atol=1e-4
    )


def test_permute_rotary_maps_interleaved_pairs_to_halves():
    # head_dim 4, one head: interleaved rows (r0, r1, r2, r3) pair as (r0,r1),(r2,r3); HF pairs (i, i + 2).
    w = torch.arange(8.0).view(4, 2)
    assert permute_rotary(w, n_heads=1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    w2 = torch.arange(16.0).view(8, 2)  # two heads are permuted independently
    assert permute_rotary(w2, n_heads=2)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0, 8.0, 12.0, 10.0, 14.0]


# ---- the real stories260K ----


@pytest.fixture
def stories(shared_dir, tmp_path):
    src = shared_dir / "data" / "models" / "stories260K"
    out = convert(src / "stories260K.bin", src / "tok512.bin", tmp_path / "stories260K")
    return src, out


def test_stories260k_config_and_greedy_story(stories):
    _, out = stories
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (
        8,
        4,
        True,
    )
    assert (cfg["rms_norm_eps"], cfg["max_position_embeddings"], cfg["hidden_act"]) == (1e-5, 512, "silu")
    model, tok = load_model(str(out))
    per_layer = 64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 64 + 3 * 172 * 64  # norms, q, k+v (GQA), o, ffn
    assert sum(p.numel() for p in model.parameters()) == 512 * 64 + 5 * per_layer + 64  # 260,032: head tied
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        gen = model.generate(torch.tensor([[tok.bos_token_id]]), do_sample=False, max_new_tokens=40)
    text = tok.decode(gen[0], skip_special_tokens=True)
    assert text.startswith(EXPECTED_STORY), text


def test_stories260k_loss_and_tokenizer_on_tinystories(stories, shared_dir):
    src, out = stories
    model, tok = load_model(str(out))
    raw = (shared_dir / "data" / "text" / "tinystories_sample.txt").read_text()
    docs = [d.strip() for d in raw.split("<|endoftext|>") if d.strip()]
    total, n = 0.0, 0
    for i, doc in enumerate(docs):
        ids = tok(doc).input_ids  # BOS + story, each well under the 512-token context
        assert ids == llama2c_encode(src / "tok512.bin", doc)
        assert tok.decode(ids, skip_special_tokens=True) == doc
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0]  # (T, V)
        if i == 0:  # the HF model is the llama2.c model, not just close in loss
            ref = llama2c_logits(*read_llama2c(src / "stories260K.bin"), ids)
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        total += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
        n += len(ids) - 1
    assert abs(total / n - 1.27) < 0.1, total / n
