"""Loss / perplexity (LMs) and accuracy (classification) of a model over encoded examples.

The same objective and levers as training (`train/objective.py`, `train/patches.py`), so a reloaded run scores
exactly what training reported.
"""

from __future__ import annotations

from torch import nn

from ..config import PerfConfig
from ..train import patches
from ..train.eval_loss import eval_loss
from ..train.objective import Objective


def evaluate(
    model: nn.Module,
    examples: list[dict],
    task: str,
    batch_size: int,
    pad_id: int,
    perf: PerfConfig | None = None,
) -> dict:
    """Mean loss per supervised token over all examples (not a mean of batch means), plus perplexity or accuracy."""
    perf = perf or PerfConfig()
    with patches.applied(model, perf, malloc=False):
        return eval_loss(Objective(model, task, perf), examples, batch_size, pad_id)
