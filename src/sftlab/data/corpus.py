"""Unlabelled text for a self-supervised objective (`train.objective: clm | mlm | span`): documents -> token
blocks, and the per-epoch corruption the training stream applies to each block (`objectives.py`).

Documents are `data.format: text` records (a .txt file's lines, paragraphs or whole file per `data.documents`; a
.jsonl/.json/.csv/.parquet file's `text` field). They are tokenized and cut into blocks of `data.max_length`
tokens, every token in exactly one block (nothing is truncated away):

- clm (causal-lm): each document is [BOS] text EOS; the block is its own label (loss on every token).
- mlm (masked-lm): each document as the tokenizer frames it ([CLS] text [SEP] for BERT; + SEP/EOS when it adds
  nothing), then blocks; masked afresh each epoch (`Masking`).
- span (seq2seq): documents joined by EOS, blocks of max_length - 1 tokens (the corrupted input + EOS then fits
  max_length); corrupted afresh each epoch (`SpanCorruption`).

The eval set is corrupted once, on its own random stream, so every eval scores the same masked positions. The
whole corpus is held in memory as token lists (about 30 bytes a token in Python): fine for corpora of tens of MB
of text; streaming larger ones is not built yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .encode import EncodedData, adds_bos, to_records
from .load import split_eval
from .objectives import EVAL, TRAIN, blocks, example_rng, mlm_mask, span_corrupt, span_counts
from .readers import read_records

OBJECTIVE_TASKS = {
    "clm": "causal-lm",
    "mlm": "masked-lm",
    "span": "seq2seq",
}  # objective -> model.task it needs
# Bytes that never occur in UTF-8 text: in sftlab's byte-level tokenizer (the tiny models) their tokens are free
# to serve as T5 sentinels.
_NON_UTF8 = bytes([0xC0, 0xC1, *range(0xF5, 0x100)])


@dataclass
class Corpus(EncodedData):
    """The blocks of a text corpus (`examples`: {"input_ids"}, plus "labels" for clm) and the corruption the
    training stream applies per (epoch, index): None for clm, whose blocks train as they are."""

    transform: Masking | SpanCorruption | None = None


@dataclass(frozen=True)
class Masking:
    """BERT's dynamic masking of one block, re-drawn each epoch from (seed, epoch, index)."""

    seed: int
    mask_id: int
    replace_ids: np.ndarray  # ids a chosen token may be replaced by (no specials)
    special_ids: np.ndarray  # ids never chosen
    probability: float = 0.15

    def __call__(self, example: dict, epoch: int, index: int, stream: int = TRAIN) -> dict:
        rng = example_rng(self.seed, epoch, index, stream)
        ids, labels = mlm_mask(
            example["input_ids"], rng, self.mask_id, self.replace_ids, self.special_ids, self.probability
        )
        return {"input_ids": ids, "labels": labels}

    def length(self, example: dict) -> int:
        return len(example["input_ids"])


@dataclass(frozen=True)
class SpanCorruption:
    """T5's span corruption of one block (+ EOS on inputs and targets), re-drawn each epoch."""

    seed: int
    sentinels: tuple[int, ...]
    eos_id: int
    density: float = 0.15
    mean_span: float = 3.0

    def __call__(self, example: dict, epoch: int, index: int, stream: int = TRAIN) -> dict:
        rng = example_rng(self.seed, epoch, index, stream)
        inputs, targets = span_corrupt(
            example["input_ids"], rng, self.sentinels, self.density, self.mean_span
        )
        return {"input_ids": inputs + [self.eos_id], "labels": targets + [self.eos_id]}

    def length(self, example: dict) -> int:
        """The corrupted example's batching cost: its lengths depend only on the block's (T5's rounding)."""
        n = len(example["input_ids"])
        noise, spans = span_counts(n, self.density, self.mean_span)
        return max(n - noise, noise) + spans + 1


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """sftlab's built-in byte-level tokenizer (the tiny models'), wherever it was loaded from."""
    from ..models import byte_tokenizer

    return tokenizer.get_vocab() == byte_tokenizer().get_vocab()


def mask_token_id(tokenizer: Any, model_name: str) -> int:
    """The tokenizer's mask token; the byte tokenizer of the tiny models has none and uses <unk>, which it never
    produces (every byte has a token)."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    if is_byte_tokenizer(tokenizer):
        return int(tokenizer.unk_token_id)
    raise ConfigError(
        f"train.objective: mlm: the tokenizer of {model_name!r} has no mask token, so there is nothing to mask "
        "with; masked language modelling needs an encoder's tokenizer (BERT, RoBERTa, MiniLM: [MASK] / <mask>)"
    )


def sentinel_ids(tokenizer: Any, model_name: str) -> tuple[int, ...]:
    """T5's sentinels <extra_id_0>, <extra_id_1>, ...; for the tiny models' byte tokenizer, the tokens of the 13
    bytes UTF-8 never uses."""
    vocab = tokenizer.get_vocab()
    found = []
    while f"<extra_id_{len(found)}>" in vocab:
        found.append(vocab[f"<extra_id_{len(found)}>"])
    if found:
        return tuple(found)
    if is_byte_tokenizer(tokenizer):
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = sorted(
            ByteLevel.alphabet()
        )  # byte b -> its character, for the bytes whose character is chr(b)
        return tuple(vocab[chr(b)] for b in _NON_UTF8 if chr(b) in alphabet)
    raise ConfigError(
        f"train.objective: span: the tokenizer of {model_name!r} has no sentinel tokens (<extra_id_0>, ...) to mark "
        "the corrupted spans with; span corruption needs a T5-family tokenizer"
    )


def _special_ids(tokenizer: Any) -> np.ndarray:
    return np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)


def _documents(records: list, tokenizer: Any, objective: str) -> list[list[int]]:
    texts = [r.text for r in records]
    ids: list[list[int]] = []
    for start in range(0, len(texts), 1024):  # fast tokenizers run a list in one call
        ids += tokenizer(texts[start : start + 1024], add_special_tokens=objective == "mlm", verbose=False)[
            "input_ids"
        ]
    eos = tokenizer.eos_token_id
    if objective == "clm":
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        return [bos + list(d) + [eos] for d in ids]
    if objective == "mlm":
        if (
            tokenizer.num_special_tokens_to_add() == 0
        ):  # nothing marks where a document ends: add SEP (or EOS)
            sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else eos
            return [list(d) + ([sep] if sep is not None else []) for d in ids]
        return [list(d) for d in ids]
    return [list(d) + [eos] for d in ids]


def encode_corpus(records: list, tokenizer: Any, data_cfg: Any, objective: str) -> EncodedData:
    """Text records -> blocks (see the module doc); stats as encode_dataset's."""
    recs = to_records(records, "text")
    if not recs:
        raise DataError("no records to encode")
    n = data_cfg.max_length - (1 if objective == "span" else 0)
    if n < 2:
        raise ConfigError(f"data.max_length: {data_cfg.max_length} leaves no room for a block to learn from")
    docs = _documents(recs, tokenizer, objective)
    examples = [{"input_ids": b} for b in blocks(docs, n)]
    if objective == "span":
        examples = [e for e in examples if len(e["input_ids"]) >= 2]  # one lone token has no span to corrupt
    if objective == "clm":
        examples = [{"input_ids": e["input_ids"], "labels": list(e["input_ids"])} for e in examples]
    tokens = sum(len(e["input_ids"]) for e in examples)
    stats = {"records": len(recs), "examples": len(examples), "dropped": 0, "empty": 0, "truncated": 0}
    stats["tokens"] = tokens
    stats["supervised_tokens"] = tokens - len(examples)  # clm; mlm and span: set by load_corpus
    if not examples or (objective == "clm" and stats["supervised_tokens"] == 0):
        raise DataError(f"{recs[0].where}: the corpus holds too few tokens to train on ({tokens})")
    return EncodedData(examples, stats, None)


def corruption(
    objective: str, tokenizer: Any, model_name: str, train_cfg: Any
) -> Masking | SpanCorruption | None:
    """The per-epoch corruption of `objective` (None for clm), with the tokenizer's mask or sentinel tokens."""
    if objective == "mlm":
        special = _special_ids(tokenizer)
        replace = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int64), special)
        mask = mask_token_id(tokenizer, model_name)
        return Masking(train_cfg.seed, mask, replace, special, train_cfg.noise_density)
    if objective == "span":
        sentinels = sentinel_ids(tokenizer, model_name)
        return SpanCorruption(
            train_cfg.seed,
            sentinels,
            tokenizer.eos_token_id,
            train_cfg.noise_density,
            train_cfg.mean_span_length,
        )
    return None


def check_sentinels(data: EncodedData, span: SpanCorruption, max_length: int) -> None:
    """Every block's spans need a sentinel each: refuse a max_length whose blocks would run out of them."""
    longest = max(len(e["input_ids"]) for e in data.examples)
    spans = span_counts(longest, span.density, span.mean_span)[1]
    if spans > len(span.sentinels):
        fits = max(
            n
            for n in range(2, longest + 1)
            if span_counts(n, span.density, span.mean_span)[1] <= len(span.sentinels)
        )
        raise ConfigError(
            f"data.max_length: {max_length}: a block of {longest} tokens gets {spans} corrupted spans, but the "
            f"tokenizer has {len(span.sentinels)} sentinel tokens (one per span); set data.max_length to at most "
            f"{fits + 1}"
        )


def load_corpus(
    data_cfg: Any, tokenizer: Any, model_name: str, train_cfg: Any
) -> tuple[Corpus, EncodedData | None]:
    """(train blocks with their per-epoch corruption, eval blocks corrupted once or None) for train.objective."""
    objective = train_cfg.objective
    documents = getattr(data_cfg, "documents", "line")
    train_raw = read_records(data_cfg.train, data_cfg.columns, data_cfg.limit, documents)
    if not train_raw:
        raise DataError(f"{data_cfg.train}: no records")
    eval_raw = None
    if data_cfg.eval:
        eval_raw = read_records(data_cfg.eval, data_cfg.columns, data_cfg.limit, documents)
        if not eval_raw:
            raise DataError(f"{data_cfg.eval}: no records")
    elif data_cfg.eval_fraction > 0:
        train_raw, eval_raw = split_eval(train_raw, data_cfg.eval_fraction, train_cfg.seed)
    transform = corruption(objective, tokenizer, model_name, train_cfg)
    train = encode_corpus(train_raw, tokenizer, data_cfg, objective)
    evald = encode_corpus(eval_raw, tokenizer, data_cfg, objective) if eval_raw is not None else None
    if isinstance(transform, SpanCorruption):
        for part in (train, evald):
            if part is not None:
                check_sentinels(part, transform, data_cfg.max_length)
    if isinstance(
        transform, Masking
    ):  # expected per epoch: the chosen share of the tokens that can be chosen
        maskable = sum(int((~np.isin(e["input_ids"], transform.special_ids)).sum()) for e in train.examples)
        train.stats["supervised_tokens"] = round(maskable * transform.probability)
    elif isinstance(transform, SpanCorruption):  # exact: the targets' lengths depend only on the blocks'
        counts = (
            span_counts(len(e["input_ids"]), transform.density, transform.mean_span) for e in train.examples
        )
        train.stats["supervised_tokens"] = sum(noise + spans + 1 for noise, spans in counts)
    if transform is not None and evald is not None:
        evald.examples = [transform(e, 0, i, EVAL) for i, e in enumerate(evald.examples)]
        evald.stats["supervised_tokens"] = sum(sum(1 for v in e["labels"] if v >= 0) for e in evald.examples)
    return Corpus(train.examples, train.stats, None, transform), evald


def eval_corpus(data_cfg: Any, tokenizer: Any, model_name: str, train_cfg: Any) -> EncodedData:
    """One text file's blocks as evaluation sees them (corrupted once, on the eval stream): `sftlab eval` of a
    self-supervised run."""
    objective = train_cfg.objective
    raw = read_records(
        data_cfg.train, data_cfg.columns, data_cfg.limit, getattr(data_cfg, "documents", "line")
    )
    if not raw:
        raise DataError(f"{data_cfg.train}: no records")
    data = encode_corpus(raw, tokenizer, data_cfg, objective)
    transform = corruption(objective, tokenizer, model_name, train_cfg)
    if isinstance(transform, SpanCorruption):
        check_sentinels(data, transform, data_cfg.max_length)
    if transform is not None:
        data.examples = [transform(e, 0, i, EVAL) for i, e in enumerate(data.examples)]
    return data
