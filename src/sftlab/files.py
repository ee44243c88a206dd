"""Checked reads of the files sftlab writes into run directories (safetensors, JSON, JSON lines), and the atomic
JSON write and status record that pipelines and self-training keep.

A truncated or garbled file (a full disk, a copy cut short, a hand edit) is an error naming the file and what is
wrong with it, never a path-less traceback from safetensors or json. The error type is the caller's: RunDirError
for a run's final/ and logs, CheckpointError for checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import RunDirError, SftlabError


def check_safetensors(path: str | Path, error: type[SftlabError] = RunDirError) -> None:
    """Parse the header of a safetensors file (cheap: no tensor is read), so a damaged file fails with its name
    before a library loads it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: not a valid safetensors file (truncated?): {_reason(e)}") from None


def read_safetensors(path: str | Path, error: type[SftlabError] = RunDirError) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or garbled one is `error` naming the file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: not a valid safetensors file (truncated?): {_reason(e)}") from None


def read_json(path: str | Path, what: str = "JSON", error: type[SftlabError] = RunDirError) -> Any:
    """A JSON file's value; unreadable or invalid JSON is `error` naming the file (and the line)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: broken {what}: {e.msg} (column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable {what}: {_reason(e)}") from None


def read_json_object(path: str | Path, what: str, error: type[SftlabError] = RunDirError) -> dict:
    """read_json for files that hold one object (sftlab.json, manifests)."""
    value = read_json(path, what, error)
    if not isinstance(value, dict):
        raise error(f"{path}: broken {what}: expected a JSON object (got {type(value).__name__})")
    return value


def read_jsonl(
    path: str | Path,
    what: str = "JSON lines",
    error: type[SftlabError] = RunDirError,
    drop_cut_tail: bool = False,
) -> list[dict]:
    """The objects of a JSON-lines file, blank lines skipped; a bad line is `error` naming file:line.
    `drop_cut_tail`: an appended log whose last line has no newline was cut short mid-write (a kill); drop it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable {what}: {_reason(e)}") from None
    lines = text.splitlines()
    if drop_cut_tail and lines and not text.endswith("\n"):
        lines.pop()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{i}: broken {what}: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{i}: broken {what}: expected a JSON object (got {type(row).__name__})")
        rows.append(row)
    return rows


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def weights_digest(model_dir: str | Path) -> str:
    """sha256 over a model directory's weight files (name and bytes): which model a later stage or round started
    from, so a rerun can tell that it has changed since."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, value: Any) -> None:
    """Beside and renamed: the file is either absent or whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


@contextmanager
def recorded(record: dict, write: Callable[[dict], None]) -> Iterator[dict]:
    """A multi-run job's record: its `status` becomes 'interrupted' (Ctrl-C) or 'failed' when the body stops early,
    and the record is written whatever happens, so a rerun knows where the job stood."""
    try:
        yield record
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        raise
    except BaseException:
        record["status"] = "failed"
        raise
    finally:
        write(record)
