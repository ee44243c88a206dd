"""Shared test helpers: an independent byte -> id table for the tiny byte tokenizer, and a DataConfig maker."""

from __future__ import annotations

from sftlab.config import DataConfig

PAD, BOS, EOS = 0, 1, 2
IGN = -100


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable char map (what the ByteLevel pre-tokenizer uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_CHARS = _bytes_to_unicode()
_ORDER = {ch: 4 + i for i, ch in enumerate(sorted(_CHARS.values()))}  # 4 specials first, then sorted chars
BYTE_ID = {b: _ORDER[ch] for b, ch in _CHARS.items()}


def b(s: str) -> list[int]:
    """Expected byte-tokenizer ids of plain text (no special tokens inside)."""
    return [BYTE_ID[x] for x in s.encode("utf-8")]


def cfg(fmt: str, **kw) -> DataConfig:
    return DataConfig(train=kw.pop("train", "unused.jsonl"), format=fmt, **kw)


CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
