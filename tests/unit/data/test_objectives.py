"""Self-supervised objectives (issue 18 item 1): CLM blocks, BERT masking and T5 span corruption as pure functions
(data/objectives.py), their corpus loading (data/corpus.py), and the per-epoch re-draw through the stream."""

from collections import Counter

import numpy as np
import pytest

from sftlab.config import PerfConfig, TrainConfig, build_config
from sftlab.data import IGNORE, read_records
from sftlab.data.corpus import SpanCorruption, corruption, encode_corpus, load_corpus, sentinel_ids
from sftlab.data.objectives import (
    EVAL,
    blocks,
    example_rng,
    mlm_mask,
    noise_mask,
    span_corrupt,
    span_counts,
    span_reconstruct,
)
from sftlab.errors import ConfigError
from sftlab.models import byte_tokenizer
from sftlab.train.stream import BatchStream

SPECIAL = np.array([0, 1, 2, 3])
REPLACE = np.arange(4, 260)


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(4, 260, n).tolist()


# -- CLM blocks --------------------------------------------------------------------------------------------


def test_blocks_are_the_concatenated_documents_cut_exactly():
    docs = [_ids(n, seed=n) for n in (1, 7, 30, 2, 64, 5)]
    out = blocks(docs, 16)
    assert [t for b in out for t in b] == [t for d in docs for t in d]
    assert all(len(b) == 16 for b in out[:-1]) and 0 < len(out[-1]) <= 16
    assert len(out) == -(-sum(map(len, docs)) // 16)


def test_clm_corpus_joins_documents_with_eos_and_supervises_every_token(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "c.txt").write_text("one doc here\nanother, longer document follows\n\nthird\n")
    recs = read_records(tmp_path / "c.txt")
    cfg = build_config({"model": {"name": "tiny-llama"}, "data": {"train": "x", "max_length": 8},
                        "train": {"objective": "clm"}})  # fmt: skip
    data = encode_corpus(recs, tok, cfg.data, "clm")
    flat = [t for ex in data.examples for t in ex["input_ids"]]
    want = []
    for text in ("one doc here", "another, longer document follows", "third"):
        want += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert flat == want
    assert all(ex["labels"] == ex["input_ids"] for ex in data.examples)
    assert all(len(ex["input_ids"]) == 8 for ex in data.examples[:-1])
    assert data.stats["supervised_tokens"] == len(flat) - len(data.examples)


# -- MLM masking -------------------------------------------------------------------------------------------


def test_mlm_masking_statistics_are_berts():
    ids = _ids(40_000)
    ids[::50] = [1] * len(ids[::50])  # specials scattered through the text are never chosen
    out, labels = mlm_mask(ids, example_rng(0, 0, 0), 3, REPLACE, SPECIAL, 0.15)
    x, out, labels = np.array(ids), np.array(out), np.array(labels)
    chosen = labels != IGNORE
    maskable = x != 1
    assert not chosen[~maskable].any() and (out[~maskable] == 1).all()
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.006
    assert (labels[chosen] == x[chosen]).all()
    assert (out[~chosen] == x[~chosen]).all()  # unchosen tokens are untouched
    masked = (out == 3) & chosen
    kept = (out == x) & chosen
    rand = chosen & ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.02
    # a random replacement equals the token itself 1 time in 256: counted as kept
    assert abs(rand.sum() / n - 0.1 * 255 / 256) < 0.015 and abs(kept.sum() / n - 0.1 - 0.1 / 256) < 0.015
    assert np.isin(out[rand], REPLACE).all()


def test_mlm_masking_is_a_pure_function_of_seed_epoch_and_index():
    ids = _ids(500)
    draw = lambda seed, epoch, index: mlm_mask(ids, example_rng(seed, epoch, index), 3, REPLACE, SPECIAL)  # noqa: E731
    assert draw(0, 1, 5) == draw(0, 1, 5)
    others = [draw(1, 1, 5), draw(0, 2, 5), draw(0, 1, 6)]
    assert all(o[1] != draw(0, 1, 5)[1] for o in others)  # another seed, epoch or example: other positions


def test_the_stream_redraws_the_masking_each_epoch_and_replays_it_exactly():
    tok = byte_tokenizer()
    masking = corruption("mlm", tok, "tiny-bert", TrainConfig(seed=3))
    examples = [{"input_ids": _ids(40, seed=i)} for i in range(8)]
    stream = BatchStream(examples, "masked-lm", 0, TrainConfig(batch_size=4), PerfConfig(), False,
                         transform=masking)  # fmt: skip
    assert stream.lengths == [40] * 8
    e0, e1 = stream.example(2, 0), stream.example(2, 1)
    assert e0["labels"] != e1["labels"]
    assert e0 == stream.example(2, 0) == masking(examples[2], 0, 2)
    assert masking(examples[2], 0, 2, EVAL) != e0  # the eval set has its own stream


def test_byte_tokenizer_masks_with_unk_which_text_never_produces():
    tok = byte_tokenizer()
    masking = corruption("mlm", tok, "tiny-bert", TrainConfig())
    assert masking.mask_id == tok.unk_token_id
    ids = tok("naïve café — 東京 ✓ \x00\x7f", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert not np.isin(masking.replace_ids, masking.special_ids).any()


def test_tokenizers_without_mask_or_sentinel_tokens_are_refused_by_name():
    class Plain:  # a GPT-2-like tokenizer: no mask token, no <extra_id_N>, not the byte tokenizer
        mask_token_id = None
        all_special_ids = [0]

        def get_vocab(self):
            return {"a": 0, "b": 1}

        def __len__(self):
            return 2

    with pytest.raises(
        ConfigError, match=r"train.objective: span: the tokenizer of 'gpt2' has no sentinel tokens"
    ):
        corruption("span", Plain(), "gpt2", TrainConfig())
    with pytest.raises(ConfigError, match=r"train.objective: mlm: the tokenizer of 'gpt2' has no mask token"):
        corruption("mlm", Plain(), "gpt2", TrainConfig())


# -- T5 span corruption ------------------------------------------------------------------------------------

SENTINELS = tuple(range(1000, 1100))


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64, 511])
def test_span_corruption_round_trips_and_has_t5s_counts(n):
    for seed in range(20):
        ids = _ids(n, seed)
        inputs, targets = span_corrupt(ids, example_rng(seed, 0, n), SENTINELS)
        assert span_reconstruct(inputs, targets, SENTINELS) == ids
        noise, spans = span_counts(n)
        used = [t for t in inputs if t in SENTINELS]
        assert used == list(SENTINELS[:spans])  # one sentinel per span, in order
        assert [t for t in targets if t in SENTINELS] == used and targets[0] == SENTINELS[0]
        assert len(inputs) == n - noise + spans and len(targets) == noise + spans
        assert inputs[-1] == SENTINELS[spans - 1]  # T5's layout ends with a span


def test_span_noise_is_15_percent_in_spans_of_mean_3():
    n, lengths, noisy = 500, [], 0
    for seed in range(200):
        mask = noise_mask(n, example_rng(seed, 0, 0))
        noisy += mask.sum()
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0])))[::2]  # lengths of True runs
        lengths += runs.tolist()
        assert not mask[0] and mask[-1]
    assert noisy / (200 * n) == pytest.approx(0.15, abs=0.001)  # round(n * 0.15) exactly each time
    assert np.mean(lengths) == pytest.approx(3.0, abs=0.05)
    assert min(lengths) >= 1 and max(Counter(lengths)) > 3  # random lengths, not all 3


def test_span_corruption_examples_end_in_eos_and_their_lengths_are_known_in_advance():
    span = SpanCorruption(0, SENTINELS, 2)
    for n in (2, 9, 100):
        ex = span({"input_ids": _ids(n)}, 4, 1)
        assert ex["input_ids"][-1] == 2 and ex["labels"][-1] == 2
        assert span.length({"input_ids": _ids(n)}) == max(len(ex["input_ids"]), len(ex["labels"]))


def test_byte_tokenizer_sentinels_are_bytes_utf8_never_uses():
    tok = byte_tokenizer()
    sentinels = sentinel_ids(tok, "tiny-t5")
    assert len(sentinels) == 13 and len(set(sentinels)) == 13
    text = "".join(chr(c) for c in range(32, 0x3000, 7))  # a wide sweep of code points
    assert not set(tok(text, add_special_tokens=False)["input_ids"]) & set(sentinels)


def test_too_long_blocks_for_the_sentinels_are_refused_naming_max_length(tmp_path):
    (tmp_path / "c.txt").write_text("word " * 400)
    cfg = build_config({"model": {"name": "tiny-t5"}, "data": {"train": str(tmp_path / "c.txt"), "max_length": 400},
                        "train": {"objective": "span"}})  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"data.max_length: 400: a block of 399 tokens gets 20 corrupted spans"
    ):
        load_corpus(cfg.data, byte_tokenizer(), "tiny-t5", cfg.train)


# -- config ------------------------------------------------------------------------------------------------


def _cfg(**train):
    return {"model": {"name": "tiny-bert"}, "data": {"train": "x.txt"}, "train": train}


@pytest.mark.parametrize("objective,task", [("clm", "causal-lm"), ("mlm", "masked-lm"), ("span", "seq2seq")])
def test_an_objective_sets_the_task_and_text_format_it_needs(objective, task):
    cfg = build_config(_cfg(objective=objective))
    assert cfg.model.task == task and cfg.data.format == "text"


def test_objective_conflicts_are_config_errors_naming_the_keys():
    raw = _cfg(objective="mlm")
    raw["model"]["task"] = "seq-cls"
    with pytest.raises(ConfigError, match=r"model.task: 'seq-cls' does not fit train.objective: mlm"):
        build_config(raw)
    raw = _cfg(objective="clm")
    raw["data"]["format"] = "alpaca"
    with pytest.raises(
        ConfigError, match=r"data.format: 'alpaca': train.objective: clm reads unlabelled text"
    ):
        build_config(raw)
    raw = _cfg()
    raw["model"]["task"] = "masked-lm"
    with pytest.raises(ConfigError, match=r"model.task: masked-lm trains with train.objective: mlm"):
        build_config(raw)


# -- documents of a .txt file ------------------------------------------------------------------------------


def test_txt_documents_by_line_paragraph_or_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a one\na two\n\n\nb one\n  \nc one\nc two\n")
    by = {mode: [(r.where.rsplit(":", 1)[1], r.fields["text"]) for r in read_records(f, documents=mode)]
          for mode in ("line", "paragraph", "file")}  # fmt: skip
    assert by["line"] == [("1", "a one"), ("2", "a two"), ("5", "b one"), ("7", "c one"), ("8", "c two")]
    assert by["paragraph"] == [("1", "a one\na two"), ("5", "b one"), ("7", "c one\nc two")]
    assert by["file"] == [("1", f.read_text())]


def test_jsonl_documents_keep_their_lines_and_other_fields_are_not_read(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "first line\\nsecond line", "label": "not read"}\n{"body": "x", "text": "two"}\n')
    cfg = build_config({"model": {"name": "tiny-llama"}, "data": {"train": str(f), "max_length": 64},
                        "train": {"objective": "clm"}})  # fmt: skip
    tok = byte_tokenizer()
    train, _ = load_corpus(cfg.data, tok, "tiny-llama", cfg.train)
    assert tok.decode(train.examples[0]["input_ids"]) == "first line\nsecond line</s>two</s>"
