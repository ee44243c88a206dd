"""Datasets by name: a `datasets.yaml` registry maps short names to a file (or a Hub dataset) and how to read it,
so a config says `data.train: my_sst2` (LLaMA-Factory's dataset_info.json idea).

    my_sst2:                        # the name configs use
      file: sst2/train.tsv          # a file or directory, relative to this datasets.yaml's folder
      format: classification        # data.format
      columns: {text: sentence}     # data.columns (new name: field in the file)
    glue_sst2:
      hf: nyu-mll/glue              # or a Hub dataset (read through datasets.load_dataset; offline: its cache)
      subset: sst2
      split: validation             # default train
      format: classification
      columns: {text: sentence}

Where the registry is looked up, first hit wins per name: `datasets.yaml` beside the config file (for a run's saved
config, that is the run directory), then in the working directory. The name is replaced when the config loads, so
the run's saved config.yaml holds the file (or `hf:` spec), format and columns it used. A key the config sets itself
(data.format, data.columns, ...) wins over the registry's. A value that is an existing path is never looked up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError
from .readers import HUB_PREFIX, is_hub_name

REGISTRY_FILE = "datasets.yaml"
# entry key -> the data: key it fills (file/hf/split become data.train itself)
_COPIED = ("format", "columns", "documents", "label_names", "subset", "system_prompt")
_KEYS = ("file", "hf", "split", *_COPIED)


@dataclass
class Entry:
    """One registered dataset: where its records are (a path, or `hf:ORG/NAME[:split]`), and the data keys it sets."""

    name: str
    source: str
    keys: dict[str, Any] = field(default_factory=dict)
    registry: Path | None = None


def registry_paths(config_dir: Path | None) -> list[Path]:
    """The datasets.yaml files that exist, in lookup order: beside the config, then in the working directory."""
    dirs = ([config_dir] if config_dir is not None else []) + [Path(".")]
    out: list[Path] = []
    for d in dirs:
        p = d / REGISTRY_FILE
        if p.is_file() and not any(p.resolve() == q.resolve() for q in out):
            out.append(p)
    return out


def read_registry(path: Path) -> dict[str, Entry]:
    """The entries of one datasets.yaml; a DataError names the file, the entry and the key that is wrong."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping of dataset names to entries (got {type(raw).__name__})")
    out: dict[str, Entry] = {}
    for name, spec in raw.items():
        where = f"{path}: {name}"
        if not isinstance(spec, dict):
            raise DataError(
                f"{where}: expected a mapping with file or hf, format, columns, ... (got {spec!r:.60})"
            )
        unknown = [k for k in spec if k not in _KEYS]
        if unknown:
            raise DataError(f"{where}: {unknown[0]}: unknown key; expected one of {', '.join(_KEYS)}")
        if ("file" in spec) == ("hf" in spec):
            raise DataError(f"{where}: expected exactly one of file (a path) or hf (ORG/NAME)")
        if "file" in spec:
            if not isinstance(spec["file"], str) or not spec["file"].strip():
                raise DataError(f"{where}: file: expected a path (got {spec['file']!r:.60})")
            if "split" in spec:
                raise DataError(f"{where}: split: only with hf (a file has no splits)")
            source = os.path.normpath(path.parent / os.path.expanduser(spec["file"]))
        else:
            hub = spec["hf"]
            if not isinstance(hub, str) or not hub.strip() or hub.count("/") > 1 or ":" in hub:
                raise DataError(f"{where}: hf: expected a Hub dataset id ORG/NAME (got {hub!r:.60})")
            split = spec.get("split", "train")
            source = f"{HUB_PREFIX}{hub}:{split}"
        out[str(name)] = Entry(str(name), source, {k: spec[k] for k in _COPIED if k in spec}, path)
    return out


def looks_like_name(value: str) -> bool:
    """A bare word (no folder, no file suffix): what a registry name looks like, rather than a path."""
    return bool(value) and "/" not in value and os.sep not in value and not Path(value).suffix


def lookup(value: str, config_dir: Path | None, key: str) -> Entry | None:
    """The registry entry `value` names; None when `value` is a path (existing, `hf:`, or not a bare name) or no
    registry exists. A bare name no registry holds is a DataError listing the known names."""
    if is_hub_name(value) or Path(os.path.expanduser(value)).exists() or not looks_like_name(value):
        return None
    registries = registry_paths(config_dir)
    if not registries:
        return None
    entries: dict[str, Entry] = {}
    for reg in registries:
        for name, entry in read_registry(reg).items():
            entries.setdefault(name, entry)
    if value in entries:
        return entries[value]
    known = ", ".join(sorted(entries)) or "none"
    raise DataError(
        f"{key}: {value!r} is neither a file nor a dataset name in {', '.join(map(str, registries))}; "
        f"known names: {known}"
    )


def resolve_names(raw: dict, config_path: str | Path | None) -> dict:
    """The raw config with registered names in data.train/eval (and each data.tasks[i]'s) replaced by their source
    and the keys their entry sets (where the section does not set them itself). Applied when a config loads."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    config_dir = Path(config_path).parent if config_path is not None else None
    sections = [("data", data)]
    if isinstance(data.get("tasks"), list):
        sections += [(f"data.tasks[{i}]", t) for i, t in enumerate(data["tasks"]) if isinstance(t, dict)]
    for where, section in sections:
        for k in ("train", "eval"):
            v = section.get(k)
            entry = lookup(v, config_dir, f"{where}.{k}") if isinstance(v, str) else None
            if entry is None:
                continue
            section[k] = entry.source
            for key, value in entry.keys.items():
                if key in ("subset", "documents") and where != "data":
                    continue  # keys of data: only (a task reads data:'s)
                section.setdefault(key, value)
    return raw
