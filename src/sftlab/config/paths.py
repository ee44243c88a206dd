"""Paths in a config: one rule, relative to the working directory (as a path typed in the shell), `~` expanded."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def _user_path(v: str | None) -> str | None:
    """A path from a config: not empty (that would be the working directory), `~` expanded; relative paths stay
    relative to the working directory."""
    if v is None:
        return v
    if not v.strip():
        raise ValueError("must be a path, not empty")
    return os.path.expanduser(v)


def _config_relative_paths(raw: dict, config: Path) -> None:
    """Relative paths resolve against the working directory only. Before, a data path missing there was looked up
    beside the config; name the path that meant, rather than silently reading another file or none."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else []
    sections = [("data", data)] + [
        (f"data.tasks[{i}]", t) for i, t in enumerate(tasks) if isinstance(t, dict)
    ]
    for where, section in sections:
        for k in ("train", "eval"):
            v = section.get(k)
            if not isinstance(v, str) or not v.strip() or Path(os.path.expanduser(v)).exists():
                continue
            beside = config.parent / v
            if not Path(v).is_absolute() and beside.exists():
                raise ConfigError(
                    f"{config}: {where}.{k}: {v!r} does not exist from the working directory ({os.getcwd()}); "
                    "relative paths in a config resolve against the working directory, not the config's folder: "
                    f"did you mean {os.path.relpath(beside)!r}?"
                )
