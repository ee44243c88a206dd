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

The eval set is corrupted once, on its own random stream, so every eval scores the same masked positions.

Small corpora are held in memory as token lists (about 30 bytes a token in Python). Large ones (`data.streaming`;
null: train files over STREAM_BYTES) are streamed: records read a line at a time (`readers.iter_records`), tokenized
1,024 at a time, cut into blocks as they come (`objectives.iter_blocks`) and written to a memory-mapped Arrow file
(`blockstore.py`), so memory stays flat however large the file. Both paths run the same code on the same records (the
eval_fraction split too: `load.held_out`), so they give the same blocks, draws and training (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .blockstore import BlockStore, BlockWriter, Corrupted
from .encode import EncodedData, adds_bos, to_records
from .load import held_out, split_eval
from .objectives import EVAL, TRAIN, example_rng, iter_blocks, mlm_mask, span_corrupt, span_counts
from .readers import RawRecord, is_hub_name, iter_records, list_files, read_records

OBJECTIVE_TASKS = {
    "clm": "causal-lm",
    "mlm": "masked-lm",
    "span": "seq2seq",
}  # objective -> model.task it needs
# Bytes that never occur in UTF-8 text: in sftlab's byte-level tokenizer (the tiny models) their tokens are free
# to serve as T5 sentinels.
_NON_UTF8 = bytes([0xC0, 0xC1, *range(0xF5, 0x100)])
STREAM_BYTES = 16 * 2**20  # data.streaming: null streams a corpus whose train files are larger than this


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
        return self.length_of(len(example["input_ids"]))

    def length_of(self, n: int) -> int:
        """The batching cost of a block of n tokens (masking keeps its length)."""
        return n


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
        return self.length_of(len(example["input_ids"]))

    def length_of(self, n: int) -> int:
        """The corrupted block's batching cost: its lengths depend only on the block's, n (T5's rounding)."""
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


def streams(data_cfg: Any) -> bool:
    """Stream this corpus from disk (`data.streaming`; null: when the train files pass STREAM_BYTES)?"""
    choice = getattr(data_cfg, "streaming", None)
    if choice is not None:
        return bool(choice)
    if is_hub_name(data_cfg.train):  # a Hub dataset: datasets reads it (memory-mapped Arrow already)
        return False
    return sum(f.stat().st_size for f in list_files(data_cfg.train)) > STREAM_BYTES


class _Records:
    """A file's records, read afresh on every iteration (streamed; see readers.iter_records); with `held`, only
    those whose held-out byte equals `keep` (the eval_fraction split, held_out's mask)."""

    def __init__(self, path: str, data_cfg: Any, held: bytearray | None = None, keep: int = 0) -> None:
        self.path, self.cfg, self.held, self.keep = path, data_cfg, held, keep

    def __iter__(self) -> Iterator[RawRecord]:
        c = self.cfg
        recs = iter_records(self.path, c.columns, c.limit, getattr(c, "documents", "line"))
        if self.held is None:
            yield from recs
        else:
            yield from (r for i, r in enumerate(recs) if self.held[i] == self.keep)


def _raw_records(
    data_cfg: Any, seed: int, stream: bool
) -> tuple[Iterable[RawRecord], Iterable[RawRecord] | None]:
    """(train records, eval records or None): lists read whole, or (`stream`) re-readable streams of the same
    records, split by eval_fraction exactly as the lists are (load.held_out)."""
    documents = getattr(data_cfg, "documents", "line")
    if stream:
        train: Iterable[RawRecord] = _Records(data_cfg.train, data_cfg)
        if data_cfg.eval:
            return train, _Records(data_cfg.eval, data_cfg)
        if data_cfg.eval_fraction > 0:
            n = sum(1 for _ in train)
            if n == 0:
                raise DataError(f"{data_cfg.train}: no records")
            held = held_out(n, data_cfg.eval_fraction, seed)
            return _Records(data_cfg.train, data_cfg, held, 0), _Records(data_cfg.train, data_cfg, held, 1)
        return train, None
    train_raw = read_records(
        data_cfg.train, data_cfg.columns, data_cfg.limit, documents, getattr(data_cfg, "subset", None)
    )
    if not train_raw:
        raise DataError(f"{data_cfg.train}: no records")
    eval_raw = None
    if data_cfg.eval:
        eval_raw = read_records(
            data_cfg.eval, data_cfg.columns, data_cfg.limit, documents, getattr(data_cfg, "subset", None)
        )
        if not eval_raw:
            raise DataError(f"{data_cfg.eval}: no records")
    elif data_cfg.eval_fraction > 0:
        train_raw, eval_raw = split_eval(train_raw, data_cfg.eval_fraction, seed)
    return train_raw, eval_raw


@dataclass
class _Seen:
    records: int = 0
    first: str = ""  # where the first record is (for errors)


def _texts(records: Iterable[Any], seen: _Seen) -> Iterator[str]:
    """Each record's text (data.format text: its `text` field, checked as to_records checks it), counted."""
    for rec in records:
        text = to_records([rec], "text")[0]
        if not seen.records:
            seen.first = text.where
        seen.records += 1
        yield text.text


def _documents(texts: Iterable[str], tokenizer: Any, objective: str) -> Iterator[list[int]]:
    """Each text's ids, framed for `objective` (see the module doc), tokenized 1,024 texts a call (fast tokenizers
    run a list in one call)."""
    eos = tokenizer.eos_token_id
    head: list[int] = []
    tail: list[int] = [eos]
    if objective == "clm":
        head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    elif objective == "mlm":
        tail = []
        if (
            tokenizer.num_special_tokens_to_add() == 0
        ):  # nothing marks where a document ends: add SEP (or EOS)
            sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else eos
            tail = [sep] if sep is not None else []
    it = iter(texts)
    while chunk := list(islice(it, 1024)):
        for d in tokenizer(chunk, add_special_tokens=objective == "mlm", verbose=False)["input_ids"]:
            yield head + list(d) + tail


def encode_corpus(
    records: Iterable[Any], tokenizer: Any, data_cfg: Any, objective: str, stream: bool = False
) -> EncodedData:
    """Text records -> blocks (see the module doc); stats as encode_dataset's. With `stream`, the records are read
    as they come and the blocks go to a memory-mapped Arrow file (`blockstore.BlockStore`): the same blocks."""
    n = data_cfg.max_length - (1 if objective == "span" else 0)
    if n < 2:
        raise ConfigError(f"data.max_length: {data_cfg.max_length} leaves no room for a block to learn from")
    seen = _Seen()
    cut = iter_blocks(_documents(_texts(records, seen), tokenizer, objective), n)
    if objective == "span":
        cut = (b for b in cut if len(b) >= 2)  # one lone token has no span to corrupt
    examples: Sequence[dict]
    if stream:
        writer = BlockWriter()
        try:
            for b in cut:
                writer.add(b)
        except BaseException:
            writer.discard()
            raise
        examples = writer.finish(labels=objective == "clm")
        lengths = examples.lengths
    else:
        if objective == "clm":
            examples = [{"input_ids": b, "labels": list(b)} for b in cut]
        else:
            examples = [{"input_ids": b} for b in cut]
        lengths = [len(e["input_ids"]) for e in examples]
    if not seen.records:
        raise DataError("no records to encode")
    tokens = int(sum(lengths))
    stats = {"records": seen.records, "examples": len(examples), "dropped": 0, "empty": 0, "truncated": 0}
    stats["tokens"] = tokens
    stats["supervised_tokens"] = tokens - len(examples)  # clm; mlm and span: set by load_corpus
    if not len(examples) or (objective == "clm" and stats["supervised_tokens"] == 0):
        raise DataError(f"{seen.first}: the corpus holds too few tokens to train on ({tokens})")
    return EncodedData(examples, stats, None)  # type: ignore[arg-type]  # a list, or a BlockStore


def _lengths(data: EncodedData) -> Sequence[int]:
    ex = data.examples
    return ex.lengths if isinstance(ex, BlockStore) else [len(e["input_ids"]) for e in ex]


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
    longest = int(max(_lengths(data)))
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


def _corrupt_once(data: EncodedData, transform: Masking | SpanCorruption) -> None:
    """The eval set's corruption, drawn once on the EVAL stream: a list of the corrupted examples, or (streamed) a
    view that corrupts each as it is read (the same examples)."""
    if isinstance(data.examples, BlockStore):
        data.examples = Corrupted(data.examples, transform, 0, EVAL)  # type: ignore[assignment]
    else:
        data.examples = [transform(e, 0, i, EVAL) for i, e in enumerate(data.examples)]


def load_corpus(
    data_cfg: Any, tokenizer: Any, model_name: str, train_cfg: Any
) -> tuple[Corpus, EncodedData | None]:
    """(train blocks with their per-epoch corruption, eval blocks corrupted once or None) for train.objective.
    Large corpora (`streams`) are streamed into memory-mapped blocks; the blocks and draws are the same."""
    objective = train_cfg.objective
    stream = streams(data_cfg)
    train_raw, eval_raw = _raw_records(data_cfg, train_cfg.seed, stream)
    transform = corruption(objective, tokenizer, model_name, train_cfg)
    train = encode_corpus(train_raw, tokenizer, data_cfg, objective, stream)
    evald = None
    if eval_raw is not None:
        evald = encode_corpus(eval_raw, tokenizer, data_cfg, objective, stream)
    if isinstance(transform, SpanCorruption):
        for part in (train, evald):
            if part is not None:
                check_sentinels(part, transform, data_cfg.max_length)
    if isinstance(
        transform, Masking
    ):  # expected per epoch: the chosen share of the tokens that can be chosen
        maskable = sum(int((~np.isin(a, transform.special_ids)).sum()) for a in _id_arrays(train))
        train.stats["supervised_tokens"] = round(maskable * transform.probability)
    elif isinstance(transform, SpanCorruption):  # exact: the targets' lengths depend only on the blocks'
        counts = (span_counts(int(n), transform.density, transform.mean_span) for n in _lengths(train))
        train.stats["supervised_tokens"] = sum(noise + spans + 1 for noise, spans in counts)
    if transform is not None and evald is not None:
        _corrupt_once(evald, transform)
        evald.stats["supervised_tokens"] = sum(sum(1 for v in e["labels"] if v >= 0) for e in evald.examples)
    return Corpus(train.examples, train.stats, None, transform), evald


def _id_arrays(data: EncodedData) -> Iterator[np.ndarray]:
    ex = data.examples
    if isinstance(ex, BlockStore):
        yield from ex.arrays()
    else:
        yield from (np.asarray(e["input_ids"], dtype=np.int64) for e in ex)


def eval_corpus(data_cfg: Any, tokenizer: Any, model_name: str, train_cfg: Any) -> EncodedData:
    """One text file's blocks as evaluation sees them (corrupted once, on the eval stream): `sftlab eval` of a
    self-supervised run."""
    objective = train_cfg.objective
    stream = streams(data_cfg)
    if stream:
        raw: Iterable[RawRecord] = _Records(data_cfg.train, data_cfg)
    else:
        raw = read_records(
            data_cfg.train, data_cfg.columns, data_cfg.limit, getattr(data_cfg, "documents", "line")
        )
        if not raw:
            raise DataError(f"{data_cfg.train}: no records")
    data = encode_corpus(raw, tokenizer, data_cfg, objective, stream)
    transform = corruption(objective, tokenizer, model_name, train_cfg)
    if isinstance(transform, SpanCorruption):
        check_sentinels(data, transform, data_cfg.max_length)
    if transform is not None:
        _corrupt_once(data, transform)
    return data
