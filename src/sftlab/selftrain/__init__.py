"""Self-training with pseudo-labels (`sftlab self-train`, a pipeline stage with `self_train:`): see run.py."""

from .config import SECTION, SelfTrainConfig, load_self_train, parse_self_train, split_config
from .run import SelfTraining, check, run_self_train

__all__ = [
    "SECTION",
    "SelfTrainConfig",
    "SelfTraining",
    "check",
    "load_self_train",
    "parse_self_train",
    "run_self_train",
    "split_config",
]
