"""Which pseudo-labels a student trains on: a confidence threshold, then (optionally) class-balanced top-k.

A teacher trained on few labels usually favours one class; keeping its most confident predictions as they come
would tilt the student further towards that class each round. Class-balanced selection keeps, per class, the most
confident candidates in a fixed class ratio (the labelled set's, or equal), at most k for the largest share; of the
classes that have a confident candidate, the one with the fewest relative to its share sets how many every class
keeps (so the ratio holds even when the teacher predicts one class rarely). A class with no confident candidate at
all keeps none and is left out of the ratio: it does not zero the others (a 1-example class the teacher never
predicts with confidence would otherwise stop self-training). The caller warns, naming them.
Pure functions of the predictions: a rerun selects exactly the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence


def class_shares(counts: Sequence[int], balance: str) -> list[float]:
    """Each class's share of the kept set: the labelled counts' ratio, or equal."""
    if balance == "equal":
        return [1.0 / len(counts)] * len(counts)
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0 / len(counts)] * len(counts)


def quotas(available: Sequence[int], shares: Sequence[float], top_k: int) -> list[int]:
    """How many of each class to keep: round(t * share / max share), with t <= top_k the largest value every class
    with candidates can fill from its `available` ones. A class of share 0, or with no candidate, keeps none."""
    top = max(shares)
    if top <= 0:
        return [0] * len(shares)
    t = float(top_k)
    for avail, share in zip(available, shares):
        if share > 0 and avail > 0:  # a class with no candidate keeps none; it does not set t for the others
            t = min(t, avail * top / share)
    return [
        min(avail, round(t * share / top + 1e-9)) if share > 0 else 0
        for avail, share in zip(available, shares)
    ]


def select(
    labels: Sequence[int],
    confidence: Sequence[float],
    n_classes: int,
    threshold: float,
    top_k: int | None,
    shares: Sequence[float] | None = None,
    usable: Sequence[bool] | None = None,
) -> list[int]:
    """Indices of the kept predictions, in pool order. `labels`: each prediction's class (all 0 for generation);
    `usable`: False for a prediction that cannot be kept whatever its confidence (an unfinished answer)."""
    cand = [i for i, c in enumerate(confidence) if c >= threshold and (usable is None or usable[i])]
    if top_k is None:
        return cand
    per_class: list[list[int]] = [[] for _ in range(n_classes)]
    for i in cand:
        per_class[labels[i]].append(i)
    for members in per_class:
        members.sort(key=lambda i: (-confidence[i], i))  # most confident first; ties in pool order
    want = quotas([len(m) for m in per_class], shares or [1.0 / n_classes] * n_classes, top_k)
    return sorted(i for members, n in zip(per_class, want) for i in members[:n])
