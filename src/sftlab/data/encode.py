"""Encode canonical records into model inputs and loss labels, per task kind.

causal-lm: `{"input_ids", "labels"}` of equal length, labels -100 outside supervised spans (NOT shifted; the
loss shifts). Chat formats supervise each assistant turn's content + terminator, found by character spans of
the rendered text and one tokenization with offsets; format text supervises every token and ends with EOS.
seq2seq: `{"input_ids": source ids, "labels": target ids + EOS}`. seq-cls: `{"input_ids", "labels": int}`
(+ `token_type_ids` when the tokenizer makes them).

Examples longer than `max_length` are cut (counted in stats["truncated"]); an example left with no
supervised token is dropped (stats["dropped"]); a dataset with none at all is an error, never a silent
zero loss. A record whose response is empty (alpaca `output: ""`, a conversation whose assistant turns are all
empty, a seq2seq `target: ""`) is dropped with a warning naming it (stats["empty"]): trained on, it would teach
the model to answer with EOS at once. Real sets carry a few (the original 52k Alpaca, ShareGPT dumps), so a few
are not an error; a set where every response is empty is. A classification set needs two classes or more.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .batching import IGNORE, WEIGHT_KEY
from .formats import ROLES, Chat, Labeled, Pair, Record, Text, Turn, as_chat, as_pair, parse_record
from .readers import DataError, RawRecord, short
from .templates import get_template

log = logging.getLogger(__name__)

TASK_FORMATS = {
    "causal-lm": ("text", "alpaca", "messages", "sharegpt", "seq2seq"),
    "seq-cls": ("classification",),
    "seq2seq": ("seq2seq", "alpaca", "messages", "sharegpt"),
}


@dataclass
class EncodedData:
    """Encoded examples plus counts (records, examples, dropped, truncated, tokens, supervised_tokens)."""

    examples: list[dict]
    stats: dict[str, int] = field(default_factory=dict)
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.examples)


def check_task_format(task: str, fmt: str) -> None:
    if task not in TASK_FORMATS:
        raise DataError(f"model.task: {task!r} is not one of {', '.join(TASK_FORMATS)}")
    if fmt not in TASK_FORMATS[task]:
        raise DataError(
            f"data.format: {fmt!r} does not fit model.task {task!r}; use one of {', '.join(TASK_FORMATS[task])}"
        )


def adds_bos(tokenizer: Any) -> bool:
    """Does this tokenizer put BOS in front when encoding normally (LLaMA yes, GPT-2/Qwen no)?"""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of `text` (no added specials) and, per token, whether it overlaps a supervised char span."""
    marked = bytearray(len(text) + 1)
    for s, e in spans:
        marked[s:e] = b"\x01" * (e - s)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        sup = [any(marked[s:e]) if e > s else bool(marked[s]) for s, e in enc["offset_mapping"]]
        return ids, sup
    # Slow tokenizers have no offsets: tokenize span by span (boundaries may tokenize a little differently).
    ids, sup, pos = [], [], 0
    for s, e in [*spans, (len(text), len(text))]:
        for a, b, flag in ((pos, s, False), (s, e, True)):
            if b > a:
                piece = tokenizer(text[a:b], add_special_tokens=False, verbose=False)["input_ids"]
                ids += piece
                sup += [flag] * len(piece)
        pos = e
    return ids, sup


class Encoder:
    """Holds the per-dataset settings (template, BOS habit, label map) and encodes one record at a time."""

    def __init__(
        self,
        tokenizer: Any,
        data_cfg: Any,
        task: str,
        label_names: list[str] | None = None,
        label_source: str = "",
    ):
        self.tok, self.cfg, self.task = tokenizer, data_cfg, task
        self.template = get_template(tokenizer, data_cfg.template) if task != "seq-cls" else None
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id
        self.label_names = label_names
        self.label_source = label_source  # where the label list came from, for error messages
        self.stats = {"truncated": 0, "dropped": 0, "eos_added": 0}
        if self.eos is None and task in ("causal-lm", "seq2seq"):
            raise DataError(
                "tokenizer has no eos_token: generation could never stop; set tokenizer.eos_token"
            )

    def _with_bos(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        if self.bos is not None and (not ids or ids[0] != self.bos):
            return [self.bos, *ids], [IGNORE, *labels]
        return ids, labels

    def _truncate(self, seq: list[int], *others: list[int]) -> tuple[list[int], ...]:
        n = self.cfg.max_length
        if len(seq) <= n:
            return (seq, *others)
        self.stats["truncated"] += 1
        return (seq[:n], *(o[:n] for o in others))

    def causal(self, rec: Record) -> dict | None:
        if isinstance(rec, Text):
            ids = self.tok(rec.text, add_special_tokens=False, verbose=False)["input_ids"] + [self.eos]
            ids, labels = self._with_bos(ids, list(ids))
        else:
            r = self.template.render(as_chat(rec, self.cfg.system_prompt).turns)
            self.stats["eos_added"] += r.eos_added
            spans = [(0, len(r.text))] if self.cfg.train_on_prompt else r.spans
            ids, sup = tokenize_spans(self.tok, r.text, spans)
            labels = [t if s else IGNORE for t, s in zip(ids, sup)]
            ids, labels = self._with_bos(ids, labels)
        ids, labels = self._truncate(ids, labels)
        if all(v == IGNORE for v in labels[1:]):  # position 0 is never a target after the shift
            self.stats["dropped"] += 1
            return None
        return {"input_ids": ids, "labels": labels}

    def seq2seq(self, rec: Record) -> dict | None:
        pair = as_pair(rec)
        src = self.tok(pair.source, add_special_tokens=True, verbose=False)["input_ids"]
        if len(src) > self.cfg.max_length:
            self.stats["truncated"] += 1
            src = self.tok(pair.source, truncation=True, max_length=self.cfg.max_length)["input_ids"]
        tgt = self.tok(pair.target, add_special_tokens=False, verbose=False)["input_ids"] + [self.eos]
        (tgt,) = self._truncate(tgt)
        return {"input_ids": src, "labels": tgt}

    def classify(self, rec: Labeled) -> dict:
        text, pair = rec.text, rec.text_pair
        if pair is not None and self.tok.num_special_tokens_to_add(pair=True) == 0:
            sep = self.tok.sep_token or self.tok.eos_token or "\n"  # keep the two texts apart
            text, pair = rec.text + sep + pair, None
        enc = self.tok(text, pair, add_special_tokens=True, verbose=False)
        if len(enc["input_ids"]) > self.cfg.max_length:
            self.stats["truncated"] += 1
            enc = self.tok(
                text, pair, add_special_tokens=True, truncation=True, max_length=self.cfg.max_length
            )
        out = {"input_ids": list(enc["input_ids"]), "labels": self.label_id(rec)}
        if "token_type_ids" in enc:
            out["token_type_ids"] = list(enc["token_type_ids"])
        return out

    def label_id(self, rec: Labeled) -> int:
        names = self.label_names or []
        key = str(rec.label)
        if key in names:
            return names.index(key)
        if self.cfg.label_names and _is_int(key) and 0 <= int(key) < len(names):
            return int(key)  # data uses indices, data.label_names gives them names
        src = f" ({self.label_source})" if self.label_source else ""
        raise DataError(
            f"{rec.where}: label: expected one of {', '.join(names)}{src} (got {short(rec.label)})"
        )

    def encode(self, rec: Record) -> dict | None:
        if self.task == "causal-lm":
            return self.causal(rec)
        if self.task == "seq2seq":
            return self.seq2seq(rec)
        return self.classify(rec)


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


# The field that holds a record's response, per data.format, for messages about empty ones.
RESPONSE_FIELDS = {
    "alpaca": "output",
    "messages": "messages[].content (every assistant turn)",
    "sharegpt": "conversations[].value (every gpt/function_call turn)",
    "seq2seq": "target",
}


def empty_response(rec: Record) -> bool:
    """A chat whose assistant turns are all blank, or a pair with a blank target."""
    if isinstance(rec, Chat):
        return not any(t.content.strip() for t in rec.turns if t.role == "assistant")
    if isinstance(rec, Pair):
        return not rec.target.strip()
    return False


def drop_empty(recs: list[Record], fmt: str) -> tuple[list[Record], int]:
    """(records with a response, how many were dropped); every response empty is a DataError."""
    empty = [r for r in recs if empty_response(r)]
    if not empty:
        return recs, 0
    field_name = RESPONSE_FIELDS.get(fmt, "response")
    kept = [r for r in recs if not empty_response(r)]
    if not kept:
        raise DataError(
            f"{empty[0].where}: {field_name}: empty in every one of the {len(recs)} records, so there is "
            "nothing to learn; check data.format and data.columns (which field holds the responses?)"
        )
    where = ", ".join(r.where for r in empty[:3]) + (", ..." if len(empty) > 3 else "")
    log.warning(
        "%d of %d records dropped: %s is empty (%s); fill them in or remove them",
        len(empty),
        len(recs),
        field_name,
        where,
    )
    return kept, len(empty)


def check_classes(label_names: list[str], source: str, data_cfg: Any) -> None:
    """A classifier needs two classes: one would train to a constant and score 100% on its own data."""
    if len(label_names) >= 2:
        return
    if source == "data.label_names":
        raise DataError(
            f"data.label_names: {label_names}: a classifier needs at least 2 classes; list every class"
        )
    seen = label_names[0] if label_names else None
    raise DataError(
        f"{data_cfg.train}: label: every record has the label {seen!r}, so there is only one class to learn "
        f"(a classifier needs at least 2); add records of the other classes, or list every class in "
        f"data.label_names (e.g. label_names: [{seen}, other])"
    )


def infer_label_names(records: list[Labeled]) -> list[str]:
    """Sorted distinct labels; numerically when all labels are integers (so 2 < 10)."""
    keys = {str(r.label) for r in records}
    return sorted(keys, key=int) if all(_is_int(k) for k in keys) else sorted(keys)


def to_records(items: list[Any], fmt: str, system_prompt: str | None = None) -> list[Record]:
    """Parse raw records (RawRecord or plain dicts) into canonical ones; canonical ones pass through."""
    out: list[Record] = []
    for i, item in enumerate(items):
        if isinstance(item, Chat | Text | Labeled | Pair):
            out.append(item)
            continue
        raw = item if isinstance(item, RawRecord) else RawRecord(f"record {i + 1}", item)
        if not isinstance(raw.fields, dict):
            raise DataError(f"{raw.where}: expected an object (got {short(raw.fields)})")
        out.append(parse_record(raw, fmt, system_prompt))
    return out


def example_weights(records: list[Any], weight_field: str) -> list[float]:
    """Each raw record's loss weight: its `weight_field` (a finite number >= 0), 1 where the record has none. A field
    that no record holds is an error (a misspelt name would otherwise weigh everything 1)."""
    out, seen = [], False
    for i, item in enumerate(records):
        fields = item.fields if isinstance(item, RawRecord) else item if isinstance(item, dict) else {}
        where = item.where if isinstance(item, RawRecord) else f"record {i + 1}"
        w = fields.get(weight_field)
        if w is None:
            out.append(1.0)
            continue
        seen = True
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise DataError(
                f"{where}: {weight_field}: expected a loss weight, a number >= 0 (got {short(w)})"
            )
        out.append(float(w))
    if records and not seen:
        where = records[0].where.rsplit(":", 1)[0] if isinstance(records[0], RawRecord) else "the records"
        raise DataError(
            f"{where}: data.weight_field: {weight_field!r}: no record has this field (every example would weigh 1); "
            "check the name, or drop data.weight_field"
        )
    return out


def encode_dataset(
    records: list[Any],
    tokenizer: Any,
    data_cfg: Any,
    task: str,
    label_names: list[str] | None = None,
    weight_field: str | None = None,
) -> EncodedData:
    """Validate, render and tokenize records. `label_names` (eval sets) fixes the train label mapping.
    `weight_field`: each example carries its record's loss weight (`WEIGHT_KEY`), collated as `example_weights`."""
    check_task_format(task, data_cfg.format)
    weights = example_weights(records, weight_field) if weight_field else None
    recs = to_records(records, data_cfg.format, data_cfg.system_prompt)
    if not recs:
        raise DataError("no records to encode")
    weight_of = {id(r): w for r, w in zip(recs, weights)} if weights is not None else None
    n_records = len(recs)
    recs, n_empty = drop_empty(recs, data_cfg.format)
    source = "labels of the training data"
    if task == "seq-cls" and label_names is None:
        if data_cfg.label_names:
            label_names, source = list(data_cfg.label_names), "data.label_names"
        else:
            label_names, source = infer_label_names(recs), ""  # type: ignore[arg-type]
        check_classes(label_names, source, data_cfg)
    enc = Encoder(tokenizer, data_cfg, task, label_names, source)
    examples = []
    for r in recs:
        ex = enc.encode(r)
        if ex is not None:
            if weight_of is not None:
                ex[WEIGHT_KEY] = weight_of[id(r)]
            examples.append(ex)
    supervised = sum(_supervised(ex, task) for ex in examples)
    stats = {
        "records": n_records,
        "examples": len(examples),
        "dropped": enc.stats["dropped"],
        "empty": n_empty,
        "truncated": enc.stats["truncated"],
        "tokens": sum(
            len(ex["input_ids"]) + (len(ex["labels"]) if task == "seq2seq" else 0) for ex in examples
        ),
        "supervised_tokens": supervised,
        "eos_added": enc.stats["eos_added"],
    }
    if supervised == 0:
        raise DataError(
            f"no supervised tokens in {len(recs)} records (first: {recs[0].where}): every label is -100, "
            f"so the loss would be 0; check data.format, data.template and data.max_length={data_cfg.max_length}"
        )
    if stats["truncated"]:
        log.warning(
            "%d of %d examples cut to data.max_length=%d", stats["truncated"], len(recs), data_cfg.max_length
        )
    if stats["dropped"]:
        log.warning("%d examples dropped: no supervised token left after truncation", stats["dropped"])
    if stats["eos_added"]:
        log.warning("chat template left %d assistant turns without EOS; EOS was added", stats["eos_added"])
    return EncodedData(examples, stats, label_names if task == "seq-cls" else None)


def _supervised(ex: dict, task: str) -> int:
    if task == "seq-cls":
        return 1
    labels = ex["labels"][1:] if task == "causal-lm" else ex["labels"]
    return sum(1 for v in labels if v != IGNORE)


def encode_prompt(tokenizer: Any, data_cfg: Any, messages_or_text: str | list[dict]) -> list[int]:
    """Ids of a prompt ready for generation: chat formats render the assistant header at the end."""
    fmt = data_cfg.format
    if fmt in ("classification", "seq2seq") or (fmt == "text" and isinstance(messages_or_text, str)):
        if not isinstance(messages_or_text, str):
            raise DataError(f"data.format {fmt}: a prompt must be a string")
        if fmt != "text":
            return list(tokenizer(messages_or_text, add_special_tokens=True, verbose=False)["input_ids"])
        ids = list(tokenizer(messages_or_text, add_special_tokens=False, verbose=False)["input_ids"])
        bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids
    if isinstance(messages_or_text, str):
        turns = [Turn("user", messages_or_text, False)]
    else:
        turns = []
        for i, m in enumerate(messages_or_text):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"prompt: messages[{i}]: expected {{role: {'|'.join(ROLES)}, content: str}} (got {short(m)})"
                )
            turns.append(Turn(role, m["content"], False))
    if data_cfg.system_prompt and not any(t.role == "system" for t in turns):
        turns.insert(0, Turn("system", data_cfg.system_prompt, False))
    text = get_template(tokenizer, data_cfg.template).prompt(turns)
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids


def supervised_segments(example: dict, tokenizer: Any) -> list[str]:
    """Decoded runs of consecutive supervised tokens: what the model is trained to write (for checks, previews)."""
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(example["input_ids"], example["labels"]):
        on = lab != IGNORE
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(t)
        prev = on
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]
