"""Reading a config: YAML (duplicate keys refused), dotted `key=value` overrides, moved keys, validation into a
RunConfig with friendly errors, the remote-code rule; and writing one back."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .messages import _error_lines
from .paths import _config_relative_paths
from .perf import PERF_KEYS
from .run import RunConfig


def _format_errors(err: ValidationError) -> str:
    return "invalid config:\n  " + "\n  ".join(_error_lines(err, model=RunConfig))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: plain YAML keeps the second one
    silently (`lr: 1e-4` ... `lr: 1e-3` trains at 1e-3). Merge keys (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}  # key -> its line
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key] + 1)
                seen[key] = key_node.start_mark.line
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """YAML as safe_load reads it, with a duplicate key or a syntax error as a ConfigError naming `source`:line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(
            f"{source}:{e.line}: duplicate key {e.key!r} (first on line {e.first}); give each key once"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` pairs, each value parsed as YAML, merged into one nested dict."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, _, raw = item.partition("=")
        value = load_yaml(raw, f"override {item!r}") if raw != "" else None
        if isinstance(value, str):
            value = _yaml_float(value)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def _yaml_float(s: str) -> Any:
    """YAML 1.1 reads '1e-4' as a string; users mean a number."""
    try:
        return float(s) if any(c in s for c in "eE.") and s.strip()[0] in "0123456789-+." else s
    except ValueError:
        return s


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats(v) for v in node]
    return _yaml_float(node) if isinstance(node, str) else node


def _moved_keys(raw: dict) -> list[str]:
    """Keys that moved from `train:` to `perf:` (the speed levers), each named with its new place."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return []
    return [f"train.{k} moved to perf.{k}" for k in train if k in PERF_KEYS]


def migrate_moved_keys(raw: dict) -> dict:
    """A run directory's own config.yaml from before `perf:` existed: move its levers (ours to move)."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return raw
    moved = {k: train.pop(k) for k in list(train) if k in PERF_KEYS}
    if moved:
        raw["perf"] = {**moved, **(raw.get("perf") or {})}
    return raw


def build_config(raw: dict, source: str = "config") -> RunConfig:
    moved = _moved_keys(raw)
    if moved:
        raise ConfigError(f"{source}: " + "; ".join(moved))
    try:
        return RunConfig.model_validate(_floats(raw))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_errors(e)}") from None


def require_remote_code_flag(cfg: RunConfig, flag: bool, source: str) -> RunConfig:
    """The remote-code rule for a config the user runs: a model repo's code runs only when the user passes
    --trust-remote-code on the command line (`flag`), which turns model.trust_remote_code on. The config alone
    cannot: a YAML you were sent, or a key you forgot, must never run code."""
    if flag:
        cfg.model.trust_remote_code = True
    elif cfg.model.trust_remote_code:
        raise ConfigError(
            f"{source}: model.trust_remote_code: true would run code from {cfg.model.name!r}, which a config cannot "
            "turn on by itself; add --trust-remote-code to the command if you trust that code"
        )
    return cfg


def ignore_saved_remote_code(cfg: RunConfig, flag: bool, source: str) -> RunConfig:
    """The remote-code rule for a run directory's saved config (eval, generate, merge): a run dir may come from
    anywhere, so its `trust_remote_code: true` is ignored with a warning; only `flag` (--trust-remote-code on the
    command line) turns remote code on."""
    if cfg.model.trust_remote_code and not flag:
        warnings.warn(
            f"{source}: model.trust_remote_code: true ignored (a run directory cannot turn on remote code); "
            "pass --trust-remote-code to run the model's own code if you trust this run directory",
            stacklevel=3,
        )
    cfg.model.trust_remote_code = flag
    return cfg


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    migrate: bool = False,
    trust_remote_code: bool = False,
) -> RunConfig:
    """Load YAML (optional), apply dotted overrides, validate.

    Every relative path (data.train, data.eval, train.output_dir) resolves against the working directory, as a path
    typed in the shell or given as an override does, so `data.train=x.jsonl` and `data: {train: x.jsonl}` mean the
    same file and a config runs the same from wherever it is kept; `~` is expanded.
    trust_remote_code: the user's --trust-remote-code (require_remote_code_flag).
    migrate: a run directory's saved config, whose pre-`perf:` lever keys are moved rather than refused; its
    remote-code setting is left for the loader of the run to judge (ignore_saved_remote_code)."""
    raw: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        raw = load_yaml(p.read_text(), str(p)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping with model/method/data/train")
        source = str(p)
    if migrate:
        raw = migrate_moved_keys(raw)
    raw = deep_merge(raw, parse_overrides(overrides or []))
    if not migrate:  # datasets.yaml names -> their files (a run's saved config holds those already)
        from ..data.registry import resolve_names

        raw = resolve_names(raw, path)
    if path is not None and not migrate:
        _config_relative_paths(raw, Path(path))
    cfg = build_config(raw, source)
    return cfg if migrate else require_remote_code_flag(cfg, trust_remote_code, source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(dump_config(cfg))
