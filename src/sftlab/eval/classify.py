"""seq-cls predictions: each eval example's predicted class and its probability, with the run's label names, and the
report built from them (confusion matrix, per-class precision/recall/F1: scores.classification_report)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import PerfConfig
from ..data import collate
from ..scores import classification_report
from ..train import patches


@torch.no_grad()
def predict(
    model: nn.Module, examples: list[dict], batch_size: int, pad_id: int, perf: PerfConfig | None = None
) -> list[tuple[int, float]]:
    """(argmax class, its softmax probability) per example, in the examples' order; batched by length."""
    model.eval()
    out: list[tuple[int, float]] = [(0, 0.0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    with patches.applied(model, perf or PerfConfig(), malloc=False):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([examples[i] for i in idx], pad_id, "seq-cls")
            device = next(model.parameters()).device
            inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "example_weights")}
            probs = model(**inputs).logits.float().softmax(-1)  # (B, C)
            best = probs.max(-1)
            for j, i in enumerate(idx):
                out[i] = (int(best.indices[j]), float(best.values[j]))
    return out


def report(
    examples: list[dict], predictions: list[tuple[int, float]], label_names: list[str], tokenizer: Any
) -> tuple[dict, list[dict]]:
    """(classification report, one predictions.jsonl row per example: text, label, prediction, confidence)."""
    gold = [int(ex["labels"]) for ex in examples]
    pred = [p for p, _ in predictions]
    rows = [
        {
            "text": tokenizer.decode(ex["input_ids"], skip_special_tokens=True),
            "label": label_names[g],
            "prediction": label_names[p],
            "confidence": conf,
            "correct": g == p,
        }
        for ex, g, (p, conf) in zip(examples, gold, predictions)
    ]
    return classification_report(gold, pred, label_names), rows
