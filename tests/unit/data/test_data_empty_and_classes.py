"""Issue 16, item 10 (data): empty responses are dropped with a counted warning naming them (an error when every
response is empty), and a classification set with a single class is an error naming the file and the label."""

from __future__ import annotations

import json
import logging
import re

import pytest
from data_testutil import cfg

from sftlab.data import DataError, encode_dataset, load_data, supervised_segments
from sftlab.models import byte_tokenizer


@pytest.fixture
def tok():
    return byte_tokenizer()


def _write(tmp_path, rows, name="train.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


EMPTY = [  # (format, task, a good record, the same record with an empty response, field named)
    ("alpaca", "causal-lm", {"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": " "}, "output"),
    (
        "messages",
        "causal-lm",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "?"}, {"role": "assistant", "content": [{"type": "text", "text": ""}]}]},
        r"messages\[\]\.content",
    ),
    (
        "sharegpt",
        "causal-lm",
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
        r"conversations\[\]\.value",
    ),
    ("seq2seq", "seq2seq", {"source": "in", "target": "out"}, {"source": "in2", "target": ""}, "target"),
    ("seq2seq", "causal-lm", {"source": "in", "target": "out"}, {"source": "in2", "target": ""}, "target"),
    ("alpaca", "seq2seq", {"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": ""}, "output"),
]  # fmt: skip


@pytest.mark.parametrize("fmt,task,good,empty,field", EMPTY, ids=[f"{e[0]}-{e[1]}" for e in EMPTY])
def test_empty_response_dropped_with_counted_warning(tmp_path, tok, caplog, fmt, task, good, empty, field):
    f = _write(tmp_path, [good, empty, good])
    with caplog.at_level(logging.WARNING, logger="sftlab.data.encode"):
        train, _ = load_data(cfg(fmt, train=str(f), template="plain"), tok, task)
    assert train.stats["records"] == 3 and train.stats["empty"] == 1 and train.stats["examples"] == 2
    assert any(
        f"{f}:2" in r.getMessage() and "1 of 3 records dropped" in r.getMessage() for r in caplog.records
    )
    assert caplog.records and any(re.search(field, r.getMessage()) for r in caplog.records)
    if task == "causal-lm":  # nothing left that trains an immediate EOS
        assert all(seg.strip() != "</s>" for ex in train.examples for seg in supervised_segments(ex, tok))


@pytest.mark.parametrize("fmt,task,good,empty,field", EMPTY, ids=[f"{e[0]}-{e[1]}" for e in EMPTY])
def test_every_response_empty_is_an_error(tmp_path, tok, fmt, task, good, empty, field):
    f = _write(tmp_path, [empty, empty])
    with pytest.raises(DataError, match=rf"{f}:1: {field}.*empty in every one of the 2 records"):
        load_data(cfg(fmt, train=str(f), template="plain"), tok, task)


def test_one_nonempty_assistant_turn_keeps_the_conversation(tok):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    data = encode_dataset([{"messages": msgs}], tok, cfg("messages"), "causal-lm")
    assert data.stats["empty"] == 0 and data.stats["examples"] == 1


def test_single_class_is_an_error_naming_file_and_label(tmp_path, tok):
    f = _write(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    with pytest.raises(DataError, match=rf"{f}: label: every record has the label 'pos'.*data\.label_names"):
        load_data(cfg("classification", train=str(f)), tok, "seq-cls")


def test_single_class_with_label_names_is_fine(tmp_path, tok):
    f = _write(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    train, _ = load_data(cfg("classification", train=str(f), label_names=["neg", "pos"]), tok, "seq-cls")
    assert train.label_names == ["neg", "pos"] and [ex["labels"] for ex in train.examples] == [1, 1]


def test_one_label_name_is_an_error(tok):
    with pytest.raises(DataError, match=r"data\.label_names: \['pos'\]: a classifier needs at least 2"):
        encode_dataset(
            [{"text": "a", "label": "pos"}], tok, cfg("classification", label_names=["pos"]), "seq-cls"
        )


def test_eval_set_with_one_class_is_fine(tmp_path, tok):
    """Only the training set defines the classes; an eval file may hold any of them."""
    f = _write(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    e = _write(tmp_path, [{"text": "c", "label": "pos"}], "eval.jsonl")
    _, ev = load_data(cfg("classification", train=str(f), eval=str(e)), tok, "seq-cls")
    assert [ex["labels"] for ex in ev.examples] == [1]
