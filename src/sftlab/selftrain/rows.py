"""The records self-training reads and writes: the unlabelled pool (prompt fields only), the labelled rows and the
dev rows as training reads them, and rows written back in the data's own field names.

The pool is read for the fields that make an input (a classification text, an instruction, a source, the turns of
a conversation up to its last non-assistant turn) and nothing else: `data.columns` renames are applied for those
fields only, and every other field (label, output, target, answers) is dropped as the record is read. So a pool that
holds labels is treated exactly as one that does not, and a label column missing from it is no error.

Rows written for a student (labelled + pseudo-labelled) carry the data's source field names (the inverse of
`data.columns`), so the student's config keeps the user's `data.columns` and reads its dev file unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..data import RawRecord, read_records, split_eval
from ..errors import ConfigError, DataError
from ..files import write_json  # noqa: F401  (re-exported: selftrain's writers live here)

# Per data.format: the fields of an input (what the teacher sees), and of a whole labelled record.
PROMPT_FIELDS = {
    "classification": ("text", "text_pair"),
    "alpaca": ("instruction", "input", "system"),
    "seq2seq": ("source",),
    "messages": ("messages",),
}
RECORD_FIELDS = {
    "classification": ("text", "text_pair", "label"),
    "alpaca": ("instruction", "input", "system", "output"),
    "seq2seq": ("source", "target"),
    "messages": ("messages",),
}
RESPONSE_FIELD = {"alpaca": "output", "seq2seq": "target"}  # messages: an appended assistant turn


def check_format(data: DataConfig, where: str) -> None:
    if data.format not in PROMPT_FIELDS:
        raise ConfigError(
            f"{where}: data.format: {data.format!r}: self-training pseudo-labels {', '.join(PROMPT_FIELDS)} data "
            "(a classification label, or a response to a prompt)"
        )


def read_pool(path: str, data: DataConfig, skip: int = 0, limit: int | None = None) -> list[RawRecord]:
    """The unlabelled pool's inputs, records skip+1.. (at most `limit`): each holds only its format's prompt fields
    (see the module doc). An `hf:` pool is read in data.subset, as data.train is."""
    keep = PROMPT_FIELDS[data.format]
    columns = {k: v for k, v in data.columns.items() if k in keep}
    out = []
    read = read_records(path, columns, None if limit is None else skip + limit, data.documents, data.subset)
    for rec in read[skip:]:
        fields = {k: rec.fields[k] for k in keep if k in rec.fields}
        if data.format == "messages":
            fields["messages"] = prompt_turns(rec.where, rec.fields.get("messages"))
        out.append(RawRecord(rec.where, fields))
    if not out:
        raise DataError(
            f"{path}: no records in the unlabelled pool" + (f" after the first {skip}" if skip else "")
        )
    return out


def prompt_turns(where: str, messages: Any) -> list:
    """A conversation up to its last non-assistant turn: the assistant turns after it (an answer) are dropped unread."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: messages: expected a non-empty list of {{role, content}} (got {messages!r:.60})"
        )
    turns = list(messages)
    while turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns.pop()
    if not turns:
        raise DataError(f"{where}: messages: expected a user turn to answer (every turn is an assistant's)")
    return turns


def labelled_and_dev(data: DataConfig, seed: int) -> tuple[list[RawRecord], list[RawRecord] | None]:
    """data.train and the dev rows exactly as a run of this config reads them (data.load_data: limit, an hf:
    dataset's subset, eval file or split)."""
    train = read_records(data.train, data.columns, data.limit, data.documents, data.subset)
    if not train:
        raise DataError(f"{data.train}: no records")
    dev = None
    if data.eval:
        dev = read_records(data.eval, data.columns, data.limit, data.documents, data.subset)
    elif data.eval_fraction > 0:
        train, dev = split_eval(train, data.eval_fraction, seed)
    return train, dev


def source_row(fields: dict, data: DataConfig, extra: tuple[str, ...] = ()) -> dict:
    """A record's format fields (and `extra` ones) under the data's source names (the inverse of data.columns)."""
    source = dict(data.columns)
    keys = RECORD_FIELDS[data.format] + extra
    return {source.get(k, k): fields[k] for k in keys if k in fields}


def check_columns(data: DataConfig, where: str) -> None:
    """Rows are written back under their source names, so data.columns must be one-to-one."""
    olds = list(data.columns.values())
    dup = next((o for o in olds if olds.count(o) > 1), None)
    if dup is not None:
        raise ConfigError(
            f"{where}: data.columns: two fields read column {dup!r}; self-training writes rows back under their "
            "column names, so each column may feed one field"
        )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Beside and renamed: the file is either absent or whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
