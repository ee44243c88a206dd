"""Smoke on the real files in ../shared/data (skipped on a fresh clone): read, validate, encode 20 records."""

from __future__ import annotations

import json

import pytest
from data_testutil import cfg

from sftlab.data import load_data, supervised_segments
from sftlab.models import byte_tokenizer

CASES = [
    ("sst2/dev.tsv", "classification", "seq-cls", {"columns": {"text": "sentence"}}),
    ("agnews/dev.tsv", "classification", "seq-cls", {"columns": {"text": "0", "label": "1"}}),
    ("instruct/alpaca_en_demo.json", "alpaca", "causal-lm", {}),
    ("instruct/v1_sft_demo.jsonl", "messages", "causal-lm", {}),
    ("instruct/glaive_toolcall_en_demo.json", "sharegpt", "causal-lm", {}),
    ("text/c4_demo.jsonl", "text", "causal-lm", {}),
]


@pytest.mark.parametrize("path,fmt,task,extra", CASES, ids=[c[0] for c in CASES])
def test_real_file_encodes(shared_dir, path, fmt, task, extra):
    tok = byte_tokenizer()
    c = cfg(fmt, train=str(shared_dir / "data" / path), limit=20, max_length=2048, **extra)
    train, ev = load_data(c, tok, task)
    assert ev is None and train.stats["records"] == 20
    assert train.stats["supervised_tokens"] > 0 and train.stats["examples"] >= 18
    for ex in train.examples:
        if task == "seq-cls":
            assert 0 <= ex["labels"] < len(train.label_names)
            continue
        assert len(ex["labels"]) == len(ex["input_ids"]) <= 2048
        if len(ex["input_ids"]) < 2048:  # untruncated: every supervised run ends the turn with EOS
            assert all(seg.endswith("</s>") for seg in supervised_segments(ex, tok))
    if task == "seq-cls":
        assert train.label_names == (
            ["0", "1"] if "sst2" in path else ["Business", "Sci/Tech", "Sports", "World"]
        )


def test_real_glaive_supervises_gpt_and_function_calls_only(shared_dir):
    tok = byte_tokenizer()
    path = shared_dir / "data" / "instruct/glaive_toolcall_en_demo.json"
    train, _ = load_data(cfg("sharegpt", train=str(path), limit=5, max_length=4096), tok, "causal-lm")
    first = json.loads(path.read_text())[0]["conversations"]
    expected = [m["value"] + "<|im_end|></s>" for m in first if m["from"] in ("gpt", "function_call")]
    assert supervised_segments(train.examples[0], tok) == expected


def test_real_bpe_tokenizer_with_its_chat_template():
    """SmolLM2's BPE tokenizer and ChatML template (cached by the quickstart, skipped when absent)."""
    from transformers import AutoTokenizer

    from sftlab.data import encode_dataset
    from sftlab.demo_model import DEMO_DIRNAME, cache_root

    d = cache_root() / DEMO_DIRNAME
    if not (d / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 tokenizer not cached")
    tok = AutoTokenizer.from_pretrained(d)
    msgs = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": " x"},
        {"role": "assistant", "content": "Sure:\n- a\n- b "},
    ]
    data = encode_dataset([{"messages": msgs}], tok, cfg("messages"), "causal-lm")
    ex = data.examples[0]
    rendered = tok.apply_chat_template(msgs, tokenize=False)  # includes the template's default system turn
    assert (
        ex["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    )  # one tokenization, in context
    assert supervised_segments(ex, tok) == ["Hello! How can I help?<|im_end|>", "Sure:\n- a\n- b <|im_end|>"]
    assert data.stats["eos_added"] == 0


def test_real_trec_label_file_reads_all_lines_with_coarse_labels(shared_dir):
    """trec/train_5500.label is ISO-8859-1 `COARSE:fine question` lines (../shared/data/SOURCES.md)."""
    path = shared_dir / "data" / "trec" / "train_5500.label"
    train, _ = load_data(cfg("classification", train=str(path)), byte_tokenizer(), "seq-cls")
    assert train.stats["records"] == 5452
    assert train.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    fine, _ = load_data(
        cfg("classification", train=str(path), columns={"label": "fine_label"}), byte_tokenizer(), "seq-cls"
    )
    assert len(fine.label_names) == 50 and "DESC:manner" in fine.label_names
