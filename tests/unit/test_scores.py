"""Answer scores (scores.py) against hand-computed values: SQuAD's normalisation, exact match, token F1."""

import pytest

from sftlab.data.templates import END_OF_TURN
from sftlab.scores import cut_at, exact_match, label_match, normalize_answer, token_f1


@pytest.mark.parametrize(
    "text,normal",
    [
        ("The Cat, sat!", "cat sat"),
        ("  An apple   a day ", "apple day"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer_is_squads(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match():
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("", "the") == 1.0  # both normalise to nothing


@pytest.mark.parametrize(
    "pred,ref,f1",
    [
        (
            "the cat sat on the mat",
            "a cat on a mat",
            6 / 7,
        ),  # 3 common of 4 predicted, 3 reference: P 3/4, R 1
        ("red red blue", "red blue blue", 2 / 3),  # multiplicity: red 1 + blue 1 in common
        ("moon", "moon moon", 2 / 3),  # P 1, R 1/2
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("the", "a", 1.0),  # both empty once normalised
        ("cat", "", 0.0),
        ("", "cat", 0.0),
        ("Paris!", "paris", 1.0),
    ],
)
def test_token_f1_hand_computed(pred, ref, f1):
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_label_match_is_exact_but_for_outer_whitespace():
    assert label_match(" positive\n", "positive") == 1.0
    assert label_match("Positive", "positive") == 0.0
    assert label_match("positive.", "positive") == 0.0


def test_cut_at_the_first_end_of_turn_marker():
    assert cut_at("neg<|im_end|></s>", END_OF_TURN) == "neg"
    assert cut_at(" moon moon </s><|im_end|>", END_OF_TURN) == "moon moon"
    assert cut_at("no marker ", END_OF_TURN) == "no marker"
    assert cut_at("<|im_end|>after", END_OF_TURN) == ""
