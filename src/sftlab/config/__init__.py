"""Run configuration: pydantic models, YAML loading, dotted `key=value` overrides, friendly errors.

This package is the one import place (`from sftlab.config import RunConfig, load_config`); its modules:
    model.py, data.py, train.py, perf.py   one section each (`model:`, `data:`, `train:`, `perf:`)
    run.py        RunConfig: the sections, the method config chosen by method.name, checks across sections
    load.py       YAML, overrides, moved keys, build/load/dump, the remote-code rule
    messages.py   validation errors as lines naming the key, the value, the allowed values, "did you mean"
    paths.py      how a config's paths resolve (against the working directory)
The `method:` section's models live with each method (sftlab/methods/<name>).
"""

from ..errors import ConfigError
from .data import TASK_RECORD_KEYS, DataConfig, MixingConfig, TaskConfig
from .load import (
    build_config,
    deep_merge,
    dump_config,
    ignore_saved_remote_code,
    load_config,
    load_yaml,
    migrate_moved_keys,
    parse_overrides,
    require_remote_code_flag,
    save_config,
)
from .messages import _error_lines, _suggest  # noqa: F401 - used by selftrain/config.py and pipeline.py
from .model import ModelConfig
from .paths import _config_relative_paths  # noqa: F401 - used by selftrain/config.py
from .perf import PERF_KEYS, PerfConfig
from .run import RunConfig
from .train import SEED_MAX, TrainConfig

__all__ = [
    "PERF_KEYS",
    "SEED_MAX",
    "TASK_RECORD_KEYS",
    "ConfigError",
    "DataConfig",
    "MixingConfig",
    "ModelConfig",
    "PerfConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "build_config",
    "deep_merge",
    "dump_config",
    "ignore_saved_remote_code",
    "load_config",
    "load_yaml",
    "migrate_moved_keys",
    "parse_overrides",
    "require_remote_code_flag",
    "save_config",
]
