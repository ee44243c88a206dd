"""Generation and classification metrics of `sftlab eval` (scores.py, eval/generation.py) against hand-computed values
and sacrebleu's own command line on the same files; references grouped by prompt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab.data.formats import Chat, Pair, Text, Turn
from sftlab.errors import ConfigError, DataError
from sftlab.eval.generation import group_prompts, score
from sftlab.scores import check_metrics, classification_report, score_corpus, score_example

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

HYPS = ["the cat sat on the mat", "a dog runs in the park", "there is a red house", "it rains"]
REFS = [
    ["the cat sat on a mat", "a cat sat on the mat"],
    ["the dog runs in a park", "a dog is running in the park"],
    ["there is a red house here", "a house that is red"],
    ["it is raining", "rain falls"],
]


def test_exact_f1_acc_take_the_best_reference_hand_computed():
    preds, refs = ["The cat.", "red blue", "Positive"], [["dog", "cat"], ["red", "blue green"], ["positive"]]
    got = score_corpus(["exact", "f1", "acc"], preds, refs)
    # exact: 1 (cat), 0, 1 (normalised) -> 2/3; f1: 1, max(2/3, 1/2) = 2/3, 1 -> (1 + 2/3 + 1)/3; acc: only case-exact
    assert got["exact"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert got["acc"] == pytest.approx(
        0.0
    )  # "The cat." != "cat", "red blue" != either, "Positive" != "positive"
    assert score_example(["exact", "f1"], "red blue", ["red", "blue green"]) == {
        "exact": 0.0,
        "f1": pytest.approx(2 / 3),
    }


def test_rouge_l_is_the_best_references_lcs_f_measure():
    # "the cat sat" vs "the cat sat down": LCS 3, P 3/3, R 3/4 -> F 6/7; vs "a dog": 0
    got = score_corpus(["rouge"], ["the cat sat"], [["a dog", "the cat sat down"]])
    assert got["rouge_l"] == pytest.approx(100 * 6 / 7)
    assert score_example(["rouge"], "the cat sat", ["a dog"])["rouge_l"] == 0.0


def test_bleu_and_chrf_equal_sacrebleus_command_line_on_the_same_files(tmp_path):
    (tmp_path / "hyp.txt").write_text("".join(h + "\n" for h in HYPS))
    for j in range(2):
        (tmp_path / f"ref{j}.txt").write_text("".join(r[j] + "\n" for r in REFS))
    cli = Path(sys.executable).parent / "sacrebleu"
    out = subprocess.run(
        [str(cli), str(tmp_path / "ref0.txt"), str(tmp_path / "ref1.txt"), "-i", str(tmp_path / "hyp.txt"),
         "-m", "bleu", "chrf", "-b", "-w", "6"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    out = json.loads(out)  # with two metrics and -b: a JSON list of the two scores
    got = score_corpus(["bleu", "chrf"], HYPS, REFS)
    assert got["bleu"] == pytest.approx(float(out[0]), abs=1e-6)
    assert got["chrf"] == pytest.approx(float(out[1]), abs=1e-6)
    assert 0 < got["bleu"] < 100  # not a degenerate case
    # one reference fewer for a prompt is sacrebleu's None in that stream, not an empty reference
    ragged = score_corpus(["bleu"], HYPS, [REFS[0], REFS[1], REFS[2], REFS[3][:1]])["bleu"]
    import sacrebleu

    assert ragged == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [[r[0] for r in REFS], [r[1] for r in REFS[:3]] + [None]]).score
    )
    assert ragged != pytest.approx(got["bleu"])


def test_records_with_the_same_prompt_are_one_prompt_with_several_references():
    def chat(where, user, answer, system=None):
        turns = ([Turn("system", system, False)] if system else []) + [
            Turn("user", user, False), Turn("assistant", answer, True)]  # fmt: skip
        return Chat(where, turns)

    records = [
        chat("f:1", "mr A", "ref a1"),
        chat("f:2", "mr B", "ref b1"),
        chat("f:3", "mr A", "ref a2"),
        chat("f:4", "mr A", "ref a3", system="be brief"),  # another conversation: another prompt
        chat("f:5", "mr B", ""),  # an empty answer is nothing to score against
    ]
    prompts = group_prompts(records, "causal-lm")
    assert [(p.prompt, p.references, p.where) for p in prompts] == [
        ("mr A", ["ref a1", "ref a2"], ["f:1", "f:3"]),
        ("mr B", ["ref b1"], ["f:2"]),
        ("mr A", ["ref a3"], ["f:4"]),
    ]
    assert prompts[2].model_input == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "mr A"},
    ]
    # multi-turn: the last answer is the reference, every turn before it the prompt
    multi = Chat("g:1", [Turn("user", "q1", False), Turn("assistant", "a1", True), Turn("user", "q2", False),
                         Turn("assistant", "a2", True)])  # fmt: skip
    (p,) = group_prompts([multi], "causal-lm")
    assert p.prompt == "q2" and p.references == ["a2"] and len(p.model_input) == 3
    pairs = group_prompts([Pair("s:1", "x", "X1"), Pair("s:2", "x", "X2")], "seq2seq")
    assert [(p.model_input, p.references) for p in pairs] == [("x", ["X1", "X2"])]
    with pytest.raises(DataError, match="t:1: a text record has no prompt and answer"):
        group_prompts([Text("t:1", "just text")], "causal-lm")


def test_predictions_rows_carry_per_prompt_scores_that_add_up_to_the_corpus_ones():
    prompts = group_prompts(
        [Pair(f"s:{i}", f"src {i}", r) for i, refs in enumerate(REFS) for r in refs], "seq2seq"
    )
    corpus, rows = score(["exact", "f1", "bleu"], prompts, HYPS)
    assert [r["references"] for r in rows] == REFS and [r["prediction"] for r in rows] == HYPS
    assert corpus["f1"] == pytest.approx(sum(r["scores"]["f1"] for r in rows) / 4)
    assert rows[0]["scores"]["bleu"] == pytest.approx(score_example(["bleu"], HYPS[0], REFS[0])["bleu"])


def test_classification_report_hand_computed():
    names = ["neg", "neu", "pos"]
    gold = [0, 0, 1, 2, 2, 2]
    pred = [0, 2, 1, 2, 2, 0]
    rep = classification_report(gold, pred, names)
    assert rep["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 0, 1], [0, 1, 0], [1, 0, 2]]
    assert rep["accuracy"] == pytest.approx(4 / 6)
    neg = rep["per_class"]["neg"]
    assert (neg["precision"], neg["recall"], neg["support"]) == (
        pytest.approx(1 / 2),
        pytest.approx(1 / 2),
        2,
    )
    pos = rep["per_class"]["pos"]
    assert pos["precision"] == pytest.approx(2 / 3) and pos["recall"] == pytest.approx(2 / 3)
    assert rep["macro_f1"] == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    never = classification_report([0, 1], [0, 0], ["a", "b"])["per_class"]["b"]
    assert never == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_metric_names_and_missing_packages_are_clear_errors(monkeypatch):
    assert check_metrics(["bleu", "exact", "bleu"]) == ["bleu", "exact"]
    with pytest.raises(ConfigError, match="'blue' is not one of exact, f1, acc, bleu, chrf, rouge"):
        check_metrics(["blue"])
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import fails as if not installed
    with pytest.raises(
        ConfigError, match=r"bleu needs the 'sacrebleu' package.*pip install 'sftlab\[metrics\]'"
    ):
        check_metrics(["exact", "bleu"])
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(ConfigError, match="rouge needs the 'rouge-score' package"):
        check_metrics(["rouge"])
