"""Formats -> templates -> ids/labels, checked to the exact token with the tiny byte tokenizer."""

from __future__ import annotations

import json

import pytest
from data_testutil import BOS, CHATML_JINJA, EOS, IGN, b, cfg
from tokenizers import processors

from sftlab.data import DataError, RawRecord, encode_dataset, encode_prompt, load_data, supervised_segments
from sftlab.models import byte_tokenizer


@pytest.fixture
def tok():
    return byte_tokenizer()


def _bos_tokenizer():
    """A byte tokenizer that, like LLaMA's, puts BOS in front of every encoding."""
    t = byte_tokenizer()
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    return t


def _one(records, tok, fmt, task="causal-lm", **kw):
    data = encode_dataset(records, tok, cfg(fmt, **kw), task)
    return data, data.examples[0]


def test_text_all_tokens_supervised_with_eos(tok):
    data, ex = _one([{"text": "hi there"}], tok, "text")
    assert ex["input_ids"] == b("hi there") + [EOS]
    assert ex["labels"] == ex["input_ids"]
    assert data.stats == {
        "records": 1, "examples": 1, "dropped": 0, "empty": 0, "truncated": 0,
        "tokens": 9, "supervised_tokens": 8, "eos_added": 0,
    }  # fmt: skip


def test_alpaca_chatml_exact_ids_and_labels(tok):
    _, ex = _one([{"instruction": "Add", "input": "1+1", "output": "2"}], tok, "alpaca")
    prompt = b("<|im_start|>user\nAdd\n\n1+1<|im_end|>\n<|im_start|>assistant\n")
    answer = b("2<|im_end|>") + [EOS]
    assert ex["input_ids"] == prompt + answer + b("\n")
    assert ex["labels"] == [IGN] * len(prompt) + answer + [IGN]


def test_alpaca_plain_template_with_system_prompt(tok):
    rec = {"instruction": "Hi", "input": "", "output": "Yo"}
    _, ex = _one([rec], tok, "alpaca", template="plain", system_prompt="Be brief.")
    prompt = b("Be brief.\n\nUser: Hi\nAssistant: ")
    assert ex["input_ids"] == prompt + b("Yo") + [EOS] + b("\n")
    assert ex["labels"] == [IGN] * len(prompt) + b("Yo") + [EOS, IGN]


def test_alpaca_record_system_beats_system_prompt(tok):
    _, ex = _one([{"instruction": "Q", "output": "A", "system": "S"}], tok, "alpaca", system_prompt="other")
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ")


MULTI = {
    "messages": [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "value": "Q2 "}, {"type": "text", "text": "more"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A2 é"}]},
    ]
}


def test_multi_turn_only_assistant_turns_supervised(tok):
    _, ex = _one([MULTI], tok, "messages")
    assert supervised_segments(ex, tok) == ["Hello!<|im_end|></s>", "A2 é<|im_end|></s>"]
    text = (
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|></s>\n"
        "<|im_start|>user\nQ2 more<|im_end|>\n<|im_start|>assistant\nA2 é<|im_end|></s>\n"
    )
    assert tok.decode(ex["input_ids"]) == text
    assert len(ex["labels"]) == len(ex["input_ids"])


def test_loss_weight_zero_turn_not_supervised(tok):
    rec = json.loads(json.dumps(MULTI))
    rec["messages"][2]["loss_weight"] = 0.0
    _, ex = _one([rec], tok, "messages")
    assert supervised_segments(ex, tok) == ["A2 é<|im_end|></s>"]


def test_train_on_prompt_supervises_everything(tok):
    _, ex = _one([MULTI], tok, "messages", train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_tokenizer_chat_template_spans(tok):
    tok.chat_template = CHATML_JINJA
    data, ex = _one([MULTI], tok, "messages")
    assert supervised_segments(ex, tok) == ["Hello!<|im_end|>", "A2 é<|im_end|>"]
    text = (
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nQ2 more<|im_end|>\n<|im_start|>assistant\nA2 é<|im_end|>\n"
    )
    assert ex["input_ids"] == b(text)
    sup = b("Hello!<|im_end|>")
    start = len(
        b("<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    )
    assert ex["labels"][:start] == [IGN] * start and ex["labels"][start : start + len(sup) + 1] == sup + [IGN]
    assert data.stats["eos_added"] == 0


def test_template_without_terminator_gets_eos_inserted(tok):
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    data, ex = _one([MULTI], tok, "messages")
    assert supervised_segments(ex, tok) == ["Hello!</s>", "A2 é</s>"]
    assert data.stats["eos_added"] == 2


def test_bos_added_once_for_bos_tokenizers():
    t = _bos_tokenizer()
    _, ex = _one([{"instruction": "Q", "output": "A"}], t, "alpaca")
    assert ex["input_ids"][:2] == [BOS, b("<")[0]] and ex["labels"][0] == IGN
    t.chat_template = "{{ bos_token }}" + CHATML_JINJA
    _, ex = _one([{"instruction": "Q", "output": "A"}], t, "alpaca")
    assert ex["input_ids"][:2] == [BOS, b("<")[0]]
    assert supervised_segments(ex, t) == ["A<|im_end|>"]
    assert encode_prompt(t, cfg("alpaca"), "Q")[:2] == [BOS, b("<")[0]]


def test_sharegpt_tool_calls(tok):
    rec = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "w"}'},
            {"from": "observation", "value": '{"t": 20}'},
            {"from": "gpt", "value": "20 C"},
        ],
        "tools": '[{"name": "w"}]',
    }
    _, ex = _one([rec], tok, "sharegpt")
    assert supervised_segments(ex, tok) == ['{"name": "w"}<|im_end|></s>', "20 C<|im_end|></s>"]
    text = tok.decode(ex["input_ids"])
    assert text.startswith('<|im_start|>system\nAvailable tools:\n[{"name": "w"}]<|im_end|>\n')
    assert '<|im_start|>tool\n{"t": 20}<|im_end|>\n' in text


def test_classification_labels_sorted_numerically_and_pairs(tok):
    recs = [
        {"text": "a", "label": 10},
        {"text": "b", "text_pair": "c", "label": 2},
        {"text": "d", "label": 2},
    ]
    data = encode_dataset(recs, tok, cfg("classification"), "seq-cls")
    assert data.label_names == ["2", "10"]
    assert [ex["labels"] for ex in data.examples] == [1, 0, 0]
    assert data.examples[1]["input_ids"] == b("b") + [EOS] + b("c")  # no pair specials: EOS separates


def test_classification_label_names_accept_indices(tok):
    recs = [{"text": "a", "label": "1"}, {"text": "b", "label": "negative"}]
    data = encode_dataset(recs, tok, cfg("classification", label_names=["negative", "positive"]), "seq-cls")
    assert [ex["labels"] for ex in data.examples] == [1, 0]
    assert data.label_names == ["negative", "positive"]


def test_seq2seq_and_chat_on_encoder_decoder(tok):
    _, ex = _one([{"source": "in", "target": "out"}], tok, "seq2seq", task="seq2seq")
    assert ex == {"input_ids": b("in"), "labels": b("out") + [EOS]}
    _, ex = _one([{"instruction": "do", "input": "x", "output": "y"}], tok, "alpaca", task="seq2seq")
    assert ex == {"input_ids": b("do\n\nx"), "labels": b("y") + [EOS]}


def test_seq2seq_records_on_causal_lm_become_chat(tok):
    _, ex = _one([{"source": "in", "target": "out"}], tok, "seq2seq", template="plain")
    assert ex["input_ids"] == b("User: in\nAssistant: out") + [EOS] + b("\n")
    assert supervised_segments(ex, tok) == ["out</s>"]


def test_truncation_counted_and_unsupervised_examples_dropped(tok):
    long_answer = {"instruction": "Q", "output": "x" * 100}
    long_prompt = {"instruction": "Q" * 100, "output": "A"}
    data = encode_dataset([long_answer, long_prompt], tok, cfg("alpaca", max_length=60), "causal-lm")
    assert data.stats["truncated"] == 2 and data.stats["dropped"] == 1 and data.stats["examples"] == 1
    assert len(data.examples[0]["input_ids"]) == 60


def test_no_supervised_tokens_raises(tok):
    with pytest.raises(DataError, match="no supervised tokens"):
        encode_dataset(
            [{"instruction": "Q" * 100, "output": "A"}], tok, cfg("alpaca", max_length=30), "causal-lm"
        )


def _raw(fields, line=7):
    return [RawRecord(f"train.jsonl:{line}", fields)]


@pytest.mark.parametrize(
    "fmt,fields,message",
    [
        ("alpaca", {"instruction": "Q"}, "train.jsonl:7: output: missing required field"),
        ("alpaca", {"instruction": "Q", "output": 3}, r"train.jsonl:7: output: expected a string \(got 3\)"),
        (
            "messages",
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "bot", "content": "c"}]},
            r"train.jsonl:7: messages\[2\]\.role: expected one of system, user, assistant, tool \(got 'bot'\)",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": 5}]},
            r"train.jsonl:7: messages\[0\]\.content: expected a string or a list of text parts \(got 5\)",
        ),
        (
            "messages",
            {"messages": [{"role": "user", "content": "hi"}]},
            "train.jsonl:7: messages: expected at least one assistant turn",
        ),
        ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]\.from: expected one of"),
        ("classification", {"text": "a", "label": 0.5}, r"train.jsonl:7: label: expected a string or integer"),
        ("text", {"text": ""}, "train.jsonl:7: text: expected non-empty text"),
    ],
)  # fmt: skip
def test_malformed_records_name_file_line_field(tok, fmt, fields, message):
    task = "seq-cls" if fmt == "classification" else "causal-lm"
    with pytest.raises(DataError, match=message):
        encode_dataset(_raw(fields), tok, cfg(fmt), task)


def test_format_must_fit_task(tok):
    with pytest.raises(DataError, match="does not fit model.task 'causal-lm'"):
        encode_dataset([{"text": "a", "label": 1}], tok, cfg("classification"), "causal-lm")


def test_eval_label_unseen_in_train_is_error(tmp_path, tok):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    (tmp_path / "eval.jsonl").write_text('{"text": "c", "label": "pos"}\n{"text": "d", "label": "meh"}\n')
    c = cfg("classification", train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"))
    with pytest.raises(DataError, match=r"eval\.jsonl:2: label: expected one of neg, pos .*\(got 'meh'\)"):
        load_data(c, tok, "seq-cls")


def test_eval_fraction_split_is_seeded(tmp_path, tok):
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    c = cfg("text", train=str(f), eval_fraction=0.25)

    def split(seed):
        tr, ev = load_data(c, tok, "causal-lm", seed=seed)
        return [tok.decode(e["input_ids"][:-1]) for e in tr.examples], [
            tok.decode(e["input_ids"][:-1]) for e in ev.examples
        ]

    a_tr, a_ev = split(0)
    assert len(a_ev) == 5 and len(a_tr) == 15 and sorted(a_tr + a_ev) == sorted(f"doc {i}" for i in range(20))
    assert split(0) == (a_tr, a_ev)
    assert split(1)[1] != a_ev


def test_encode_prompt_ends_with_assistant_header(tok):
    assert encode_prompt(tok, cfg("alpaca"), "hi") == b(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert encode_prompt(tok, cfg("messages", template="plain", system_prompt="S"), msgs) == b(
        "S\n\nUser: hi\nAssistant: "
    )
    tok.chat_template = CHATML_JINJA
    assert encode_prompt(tok, cfg("messages"), msgs) == b(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encode_prompt(tok, cfg("text"), "Once upon") == b("Once upon")
