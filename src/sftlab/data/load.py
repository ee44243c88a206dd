"""`load_data`: read train (and eval) files, split off an eval share if asked, encode both."""

from __future__ import annotations

import logging
import random
from array import array
from collections.abc import Callable
from typing import Any

from .encode import EncodedData, check_task_format, encode_dataset
from .readers import DataError, RawRecord, read_records

log = logging.getLogger(__name__)


def split_eval(
    records: list[RawRecord], fraction: float, seed: int
) -> tuple[list[RawRecord], list[RawRecord]]:
    """Deterministic (seeded) split; both parts keep file order. At least one record on each side."""
    held = held_out(len(records), fraction, seed)
    return [r for i, r in enumerate(records) if not held[i]], [r for i, r in enumerate(records) if held[i]]


def held_out(n: int, fraction: float, seed: int) -> bytearray:
    """Which of n records split_eval holds out (1 each), in a byte per record: a corpus streamed from disk
    (`data/corpus.py`) splits exactly as the same records read into a list do."""
    n_eval = min(n - 1, max(1, round(n * fraction)))
    if n_eval < 1:
        raise DataError(f"data.eval_fraction={fraction}: {n} record(s) is too few to split off an eval set")
    order = array("q", range(n))  # 8 bytes a record, not a list's ~36
    random.Random(seed).shuffle(order)
    held = bytearray(n)
    for i in order[:n_eval]:
        held[i] = 1
    return held


def load_data(
    data_cfg: Any,
    tokenizer: Any,
    task: str,
    seed: int = 0,
    convert: Callable[[list[RawRecord]], list] | None = None,
) -> tuple[EncodedData, EncodedData | None]:
    """(train, eval or None). Malformed data raises DataError (`path:line: field: ...`) before any training.
    `convert` turns the raw records (after the eval split) into canonical ones before encoding: a multi-task run's
    classification-as-text task (`tasks.py`)."""
    check_task_format(task, data_cfg.format)
    documents = getattr(data_cfg, "documents", "line")  # how a .txt file splits into records
    subset = getattr(data_cfg, "subset", None)  # an hf: dataset's configuration
    train_raw = read_records(data_cfg.train, data_cfg.columns, data_cfg.limit, documents, subset)
    if not train_raw:
        raise DataError(f"{data_cfg.train}: no records")
    eval_raw: list[RawRecord] | None = None
    if data_cfg.eval:
        eval_raw = read_records(data_cfg.eval, data_cfg.columns, data_cfg.limit, documents, subset)
        if not eval_raw:
            raise DataError(f"{data_cfg.eval}: no records")
    elif data_cfg.eval_fraction > 0:
        train_raw, eval_raw = split_eval(train_raw, data_cfg.eval_fraction, seed)
    if convert is not None:
        train_raw = convert(train_raw)
        eval_raw = convert(eval_raw) if eval_raw is not None else None
    weight_field = getattr(data_cfg, "weight_field", None)  # training examples only: eval scores stay plain
    train = encode_dataset(train_raw, tokenizer, data_cfg, task, weight_field=weight_field)
    log.info("train data: %s", _describe(train.stats))
    evald = None
    if eval_raw is not None:
        evald = encode_dataset(eval_raw, tokenizer, data_cfg, task, label_names=train.label_names)
        log.info("eval data: %s", _describe(evald.stats))
    return train, evald


def _describe(stats: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items())
