"""Scores of generated answers against references: exact match, token F1 (SQuAD's), label accuracy.

Pure functions on strings, a leaf: per-task evaluation during training (train/task_eval.py) and `sftlab eval` use
the same definitions.

- `exact_match`: 1.0 when the two answers are equal after SQuAD's normalisation (lower case, punctuation and the
  articles a/an/the dropped, whitespace collapsed), else 0.0.
- `token_f1`: the harmonic mean of token precision and recall between the normalised answers, tokens counted with
  multiplicity (SQuAD v1.1's `f1_score`); two empty answers score 1.0, one empty 0.0 (SQuAD v2's convention).
- `label_match`: classification as text: 1.0 when the answer is the label's name exactly (surrounding whitespace
  aside). No normalisation: the model was trained to write that name, and "Positive" is not "positive".
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def label_match(prediction: str, label: str) -> float:
    return float(prediction.strip() == label.strip())


def cut_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of `stops` (end-of-turn markers), stripped: the answer a generation or a reference
    holds, without the turn's terminator or whatever a model wrote after it."""
    end = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:end].strip()


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
