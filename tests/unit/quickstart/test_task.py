"""The quickstart task: deterministic disjoint splits and a scorer that is strict where it should be."""

import json

import pytest

from sftlab.quickstart import task
from sftlab.quickstart.task import KEYS, evaluate, make_splits, prompt_and_reference, score, write_jsonl

REF = json.dumps({"name": "Maria Lopez", "age": 34, "city": "Lisbon", "occupation": "nurse"})
REF_NULL = json.dumps({"name": "Omar Khan", "age": 51, "city": "Oslo", "occupation": None})


def _sentence(record):
    return prompt_and_reference(record)[0].removeprefix(task.INSTRUCTION)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = make_splits(50, 20, seed=0), make_splits(50, 20, seed=0), make_splits(50, 20, seed=1)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


def test_records_are_messages_with_a_reference_that_matches_the_sentence():
    train, held = make_splits(400, 100, seed=0)
    assert (len(train), len(held)) == (400, 100)
    n_null = 0
    for r in train + held:
        user, answer = r["messages"]
        assert (user["role"], answer["role"]) == ("user", "assistant")
        assert user["content"].startswith(task.INSTRUCTION)
        ref = json.loads(answer["content"])
        assert tuple(ref) == KEYS and isinstance(ref["age"], int)
        assert "\n" not in answer["content"]  # one compact line
        s = _sentence(r)
        assert ref["name"] in s and str(ref["age"]) in s and ref["city"] in s
        if ref["occupation"] is None:
            n_null += 1
            assert not any(o in s for o in task.OCCUPATIONS)
        else:
            assert ref["occupation"] in s
    assert 0.1 < n_null / 500 < 0.4  # both kinds are well represented
    assert len({_shape(r) for r in train}) >= 12  # varied sentence templates, not one


def _shape(record):
    """The sentence with the person's values blanked out: which template produced it."""
    s, ref = _sentence(record), json.loads(prompt_and_reference(record)[1])
    for k in KEYS:
        if ref[k] is not None:
            s = s.replace(str(ref[k]), f"<{k}>")
    return s


def test_splits_share_no_sentence_and_no_person():
    train, held = make_splits(400, 100, seed=3)
    names = lambda rs: {json.loads(prompt_and_reference(r)[1])["name"] for r in rs}  # noqa: E731
    assert not names(train) & names(held)
    assert len(names(train)) == 400 and len(names(held)) == 100
    assert not {_sentence(r) for r in train} & {_sentence(r) for r in held}


def test_write_jsonl_round_trips(tmp_path):
    train, _ = make_splits(5, 1)
    p = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert [json.loads(line) for line in p.read_text().splitlines()] == train


@pytest.mark.parametrize(
    "prediction, reference, exact, fields",
    [
        (REF, REF, True, 1.0),
        ('{"name": "Maria Lopez", "age": 35, "city": "Lisbon", "occupation": "nurse"}', REF, False, 0.75),
        (
            '{"name":"Maria Lopez","age":34,"city":"Lisbon","occupation":"nurse","country":"PT"}',
            REF,
            False,
            1.0,
        ),
        (REF + " I hope this helps!", REF, False, 1.0),
        (REF + "\n" + REF, REF, False, 1.0),
        (json.dumps(json.loads(REF), indent=4) + "\n\n", REF, True, 1.0),
        ('  {"occupation": "nurse", "city": "Lisbon", "age": 34, "name": "Maria Lopez"}', REF, True, 1.0),
        ('{"name": "maria lopez", "age": 34, "city": "Lisbon", "occupation": "Nurse"}', REF, False, 0.5),
        ('{"name": "Maria Lopez", "age": "34", "city": "Lisbon", "occupation": "nurse"}', REF, False, 0.75),
        ('{"name": "Omar Khan", "age": 51, "city": "Oslo"}', REF_NULL, False, 0.75),
        ('{"name": "Omar Khan", "age": 51, "city": "Oslo", "occupation": null}', REF_NULL, True, 1.0),
        ('{"name": "Omar Khan", "age": 51, "city": "Oslo", "occupation": "unknown"}', REF_NULL, False, 0.75),
        ("Sure! Here it is:\n```json\n" + REF + "\n```", REF, False, 1.0),
        ("Maria Lopez is 34 and a nurse in Lisbon.", REF, False, 0.0),
        ('{"name": "Maria Lopez", "age": 34,', REF, False, 0.0),
        ("[" + REF + "]", REF, False, 1.0),
        ("", REF, False, 0.0),
    ],
)
def test_score_hand_made_cases(prediction, reference, exact, fields):
    assert score(prediction, reference) == {"exact": exact, "fields": fields}


def test_evaluate_averages():
    out = evaluate([REF, "nope"], [REF, REF])
    assert out == {"exact": 0.5, "fields": 0.5, "n": 2}
