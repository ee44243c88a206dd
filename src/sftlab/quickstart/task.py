"""The quickstart's task: turn a sentence about a person into exactly one compact JSON object.

A small instruct model answers this loosely (prose, markdown fences, extra keys, wrong types), so a few
hundred fine-tuning examples make a visible, measurable difference. Records are generated from a seed
(no download), in the `messages` format, and scored by exact JSON equality plus a per-field share.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

KEYS = ("name", "age", "city", "occupation")
INSTRUCTION = (
    "Extract the person described in the sentence as one JSON object with exactly the keys "
    '"name", "age", "city" and "occupation" (age is a number; use null for anything the sentence does not say). '
    "Reply with the JSON object only.\n\nSentence: "
)

FIRST = (
    "Maria", "James", "Aisha", "Liam", "Sofia", "Noah", "Yuki", "Omar", "Elena", "Lucas", "Priya", "Mateo",
    "Chloe", "Ivan", "Amara", "Felix", "Nadia", "Hugo", "Leila", "Oscar", "Ingrid", "Kofi", "Mei", "Diego",
    "Hannah", "Tariq", "Zoe", "Anders", "Fatima", "Pablo", "Grace", "Kenji", "Lucia", "Samuel", "Anya", "Rafael",
    "Olivia", "Emeka", "Clara", "Dmitri", "Rosa", "Tomas", "Ines", "Arjun", "Freya", "Marco", "Sana", "Victor",
    "Julia", "Kwame", "Alice", "Bruno", "Helga", "Ravi", "Nora", "Jonas", "Layla", "Pedro", "Ewa", "Daniel",
)  # fmt: skip
LAST = (
    "Lopez", "Smith", "Khan", "Murphy", "Rossi", "Tanaka", "Haddad", "Novak", "Silva", "Mensah", "Patel", "Garcia",
    "Dubois", "Petrov", "Okafor", "Becker", "Hansen", "Kim", "Moreau", "Costa", "Nguyen", "Schmidt", "Ali",
    "Jensen", "Kowalski", "Fischer", "Santos", "Ivanova", "Brown", "Yilmaz", "Larsen", "Reyes", "Sato", "Walsh",
    "Ahmed", "Bianchi", "Lindqvist", "Osei", "Chen", "Martin", "Horvat", "Almeida", "Nakamura", "Clarke",
    "Weber", "Duarte", "Farouk", "Berg", "Romano", "Ward",
)  # fmt: skip
CITIES = (
    "Lisbon", "Toronto", "Nairobi", "Osaka", "Berlin", "Lima", "Melbourne", "Cairo", "Oslo", "Chicago",
    "Madrid", "Seoul", "Dublin", "Accra", "Krakow", "Marseille", "Hanoi", "Denver", "Porto", "Mumbai",
    "Vienna", "Bogota", "Helsinki", "Manila", "Glasgow", "Istanbul", "Montreal", "Lagos", "Prague", "Austin",
    "Naples", "Santiago", "Zurich", "Auckland", "Tunis", "Valencia", "Bergen", "Kyoto", "Leeds", "Quito",
)  # fmt: skip
OCCUPATIONS = (
    "nurse", "teacher", "software engineer", "baker", "architect", "electrician", "journalist", "pharmacist",
    "carpenter", "accountant", "photographer", "chef", "librarian", "pilot", "dentist", "plumber", "translator",
    "veterinarian", "graphic designer", "firefighter", "mechanic", "lawyer", "farmer", "musician",
    "data analyst", "police officer", "tailor", "biologist", "economist", "interior designer",
)  # fmt: skip

# {n} name, {a} age, {c} city, {o} occupation with its article ("a nurse", "an architect").
TEMPLATES_WITH_JOB = (
    "{n} is {o} who lives in {c} and is {a} years old.",
    "Meet {n}, {a}, {o} from {c}.",
    "At {a}, {n} works as {o} in {c}.",
    "{n} ({a}) has been {o} in {c} for several years.",
    "Our new neighbour {n} is {a}, lives in {c}, and works as {o}.",
    "{c} is home to {n}, {o} who just turned {a}.",
    "The article profiles {n}, {o} aged {a} based in {c}.",
    "{n}, {a} years old, is {o} living in {c}.",
    "Having moved to {c} last spring, {n} now works as {o} at the age of {a}.",
)  # fmt: skip
TEMPLATES_NO_JOB = (
    "{n} is {a} years old and lives in {c}.",
    "Born {a} years ago, {n} now calls {c} home.",
    "{n} ({a}) moved to {c} last year.",
    "My cousin {n} lives in {c} and celebrated turning {a} last week.",
    "{c} has been home to {n} since childhood; {n} is now {a}.",
)  # fmt: skip
P_NO_JOB = 0.25


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _people(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """n people with distinct full names (so a person never appears in two splits)."""
    if n > len(FIRST) * len(LAST):
        raise ValueError(f"at most {len(FIRST) * len(LAST)} distinct people; asked for {n}")
    names = rng.sample([f"{f} {s}" for f in FIRST for s in LAST], n)
    people = []
    for name in names:
        job = None if rng.random() < P_NO_JOB else rng.choice(OCCUPATIONS)
        people.append(
            {"name": name, "age": rng.randint(19, 84), "city": rng.choice(CITIES), "occupation": job}
        )
    return people


def _record(person: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    job = person["occupation"]
    template = rng.choice(TEMPLATES_NO_JOB if job is None else TEMPLATES_WITH_JOB)
    sentence = template.format(n=person["name"], a=person["age"], c=person["city"], o=_article(job or "x"))
    answer = json.dumps({k: person[k] for k in KEYS}, ensure_ascii=False)  # one line, fixed key order
    return {
        "messages": [
            {"role": "user", "content": INSTRUCTION + sentence},
            {"role": "assistant", "content": answer},
        ]
    }


def make_splits(
    n_train: int = 400, n_eval: int = 100, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (train, eval) record lists with no shared person and no shared sentence."""
    rng = random.Random(seed)
    people = _people(rng, n_train + n_eval)
    records = [_record(p, rng) for p in people]
    return records[:n_train], records[n_train:]


def prompt_and_reference(record: dict[str, Any]) -> tuple[str, str]:
    """(user message, reference JSON) of one record."""
    msgs = record["messages"]
    return msgs[0]["content"], msgs[1]["content"]


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p


_MISSING = object()


def _loose_object(text: str) -> dict[str, Any] | None:
    """The first JSON object found in text (after any prose or code fence), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return None


def score(prediction: str, reference: str) -> dict[str, Any]:
    """exact: the whole prediction is one JSON object equal to the reference (keys, values and types, case
    included; whitespace and key order ignored). fields: share of reference keys whose values match exactly
    in the first JSON object found anywhere in the prediction (a missing key never matches, even for null)."""
    ref = json.loads(reference)
    try:
        pred = json.loads(prediction.strip())
    except json.JSONDecodeError:
        pred = _MISSING
    exact = isinstance(pred, dict) and _same(pred, ref)
    loose = pred if isinstance(pred, dict) else _loose_object(prediction)
    if loose is None or not ref:
        return {"exact": exact, "fields": 0.0}
    hits = sum(_same_value(loose.get(k, _MISSING), v) for k, v in ref.items())
    return {"exact": exact, "fields": hits / len(ref)}


def _same_value(a: Any, b: Any) -> bool:
    # JSON types must agree: 34 != "34" and true != 1 (Python would say True == 1).
    return type(a) is type(b) and a == b if not isinstance(a, dict) else _same(a, b)


def _same(a: dict[str, Any], b: Any) -> bool:
    return isinstance(b, dict) and a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)


def evaluate(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact-match and field scores over pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = [score(p, r) for p, r in zip(predictions, references)]
    n = max(len(scores), 1)
    return {
        "exact": sum(s["exact"] for s in scores) / n,
        "fields": sum(s["fields"] for s in scores) / n,
        "n": len(scores),
    }
