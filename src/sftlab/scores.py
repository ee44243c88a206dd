"""Scores of generated answers against references: exact match, token F1 (SQuAD's), label accuracy, and the
corpus metrics of text generation (BLEU, chrF, ROUGE-L).

Pure functions on strings, a leaf: per-task evaluation during training (train/task_eval.py) and `sftlab eval` use
the same definitions.

- `exact_match`: 1.0 when the two answers are equal after SQuAD's normalisation (lower case, punctuation and the
  articles a/an/the dropped, whitespace collapsed), else 0.0.
- `token_f1`: the harmonic mean of token precision and recall between the normalised answers, tokens counted with
  multiplicity (SQuAD v1.1's `f1_score`); two empty answers score 1.0, one empty 0.0 (SQuAD v2's convention).
- `label_match`: classification as text: 1.0 when the answer is the label's name exactly (surrounding whitespace
  aside). No normalisation: the model was trained to write that name, and "Positive" is not "positive".

With several references per prompt (`score_corpus`, `score_example`): exact, f1 and acc take the best reference
(SQuAD's max over gold answers) and are fractions in [0, 1]; BLEU and chrF are sacrebleu's corpus scores (default
13a tokenisation, all references of a prompt at once), ROUGE-L is the mean over prompts of the best reference's
F-measure (`rouge-score`, Porter stemming); those three are on sacrebleu's 0-100 scale. sacrebleu and rouge-score
are optional (the `metrics` extra), imported only when one of their metrics is asked for.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from .errors import ConfigError

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


# -- several references, and the corpus metrics --------------------------------------------------------------------

METRICS = ("exact", "f1", "acc", "bleu", "chrf", "rouge")  # names `sftlab eval --metrics` takes
KEYS = {"exact": "exact", "f1": "f1", "acc": "acc", "bleu": "bleu", "chrf": "chrf", "rouge": "rouge_l"}
_NEEDS = {
    "bleu": ("sacrebleu", "sacrebleu"),
    "chrf": ("sacrebleu", "sacrebleu"),
    "rouge": ("rouge_score", "rouge-score"),
}
_BEST_OF = {"exact": exact_match, "f1": token_f1, "acc": label_match}


def check_metrics(names: Sequence[str]) -> list[str]:
    """The metric names, checked: each one known, and the package behind it importable (a ConfigError naming the
    metric, the package and the extra to install otherwise), before any model is loaded."""
    out = []
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"--metrics: {name!r} is not one of {', '.join(METRICS)}")
        if name in _NEEDS:
            module, package = _NEEDS[name]
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(
                    f"--metrics: {name} needs the {package!r} package, which is not installed: "
                    f"pip install 'sftlab[metrics]' (or pip install {package})"
                ) from None
        if name not in out:
            out.append(name)
    return out


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream j holds every prompt's j-th reference, None where a prompt has fewer."""
    width = max((len(r) for r in references), default=0)
    return [[r[j] if j < len(r) else None for r in references] for j in range(width)]


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def score_example(metrics: Sequence[str], prediction: str, references: Sequence[str]) -> dict[str, float]:
    """One prompt's scores against all its references (sentence BLEU/chrF for BLEU/chrF)."""
    out: dict[str, float] = {}
    for name in metrics:
        if name in _BEST_OF:
            out[KEYS[name]] = max(_BEST_OF[name](prediction, r) for r in references)
        elif name == "bleu":
            import sacrebleu

            out["bleu"] = sacrebleu.sentence_bleu(prediction, list(references)).score
        elif name == "chrf":
            import sacrebleu

            out["chrf"] = sacrebleu.sentence_chrf(prediction, list(references)).score
        elif name == "rouge":
            out["rouge_l"] = (
                100 * _rouge_scorer().score_multi(list(references), prediction)["rougeL"].fmeasure
            )
    return out


def score_corpus(
    metrics: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float | None]:
    """Corpus scores of predictions[i] against references[i] (one or more strings each); None without prompts."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if any(not r for r in references):
        raise ValueError("every prediction needs at least one reference")
    out: dict[str, float | None] = {}
    for name in metrics:
        if not predictions:
            out[KEYS[name]] = None
        elif name in _BEST_OF:
            best = _BEST_OF[name]
            out[KEYS[name]] = mean(
                [max(best(p, r) for r in refs) for p, refs in zip(predictions, references)]
            )
        elif name in ("bleu", "chrf"):
            import sacrebleu

            corpus = sacrebleu.corpus_bleu if name == "bleu" else sacrebleu.corpus_chrf
            out[name] = corpus(list(predictions), _ref_streams(references)).score
        elif name == "rouge":
            scorer = _rouge_scorer()
            f = [
                scorer.score_multi(list(refs), p)["rougeL"].fmeasure
                for p, refs in zip(predictions, references)
            ]
            out["rouge_l"] = 100 * mean(f)
    return out


def classification_report(gold: Sequence[int], predicted: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy, the confusion matrix (rows: true class, columns: predicted, in `names` order) and per-class
    precision/recall/F1 with support (a class never predicted has precision 0, one absent from `gold` recall 0),
    plus their macro mean."""
    k = len(names)
    matrix = [[0] * k for _ in range(k)]
    for g, p in zip(gold, predicted):
        matrix[g][p] += 1
    per_class = {}
    for i, name in enumerate(names):
        tp = matrix[i][i]
        predicted_i = sum(matrix[r][i] for r in range(k))
        support = sum(matrix[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "accuracy": sum(matrix[i][i] for i in range(k)) / len(gold) if len(gold) else None,
        "macro_f1": mean([c["f1"] for c in per_class.values()]),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(names), "rows_true_columns_predicted": matrix},
    }
