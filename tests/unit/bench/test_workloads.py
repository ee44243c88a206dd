"""The benchmark's B3 rows: the peer must get exactly sftlab's token ids and targets (one encoding, two views)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root: `benchmarks` is not installed

from benchmarks.workloads import as_peer_rows, real_examples, supervised_tokens  # noqa: E402
from sftlab.models import load_tokenizer  # noqa: E402
from sftlab.quickstart.task import make_splits  # noqa: E402


def test_real_rows_supervise_exactly_the_answers_and_match_the_peer_view():
    tok = load_tokenizer("tiny-llama")
    examples = real_examples(tok, n=12)
    train, _ = make_splits(12, 100, 0)
    assert len(examples) == 12
    rows = as_peer_rows(examples)
    for ex, ids, mask, rec in zip(examples, rows["input_ids"], rows["completion_mask"], train):
        assert ids == ex["input_ids"]
        assert [t for t, m in zip(ids, mask) if m] == [t for t in ex["labels"] if t != -100]
        assert mask[0] == 0  # the first token is never a target, so both sides count the same targets
        answer = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        content = rec["messages"][1]["content"]
        assert answer.startswith(content)
        assert answer[len(content) :].strip() in ("", "<|im_end|>")  # the end-of-turn marker is trained too
        first = mask.index(1)
        assert content not in tok.decode(ids[:first])  # the prompt holds no answer
    assert sum(map(sum, rows["completion_mask"])) == supervised_tokens(examples)
