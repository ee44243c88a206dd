"""Who owns a run directory, and replacing a run only once its successor has started.

sftlab marks a run directory with `.sftlab-run.json`, listing the entries it wrote. `--overwrite` deletes only
those, and a directory holding a config.yaml, checkpoints/ or final/ without the mark is someone else's: sftlab
refuses to train into it. Runs written before the mark existed count as sftlab's when their config.yaml loads as
a run config and they hold a trained model (final/sftlab.json) or a complete checkpoint.

    check_run_dir(cfg, resume, overwrite)   # before anything is loaded: refuses, never writes
    with started_run(cfg, resume, overwrite) as run_dir:   # after data, model and resume are validated
        ...fit...
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, dump_config, load_config, save_config
from .errors import RunDirError, SftlabError
from .train.checkpoint import STATE_FILE, list_checkpoints

MANIFEST = ".sftlab-run.json"
ASIDE = ".previous-run"  # the replaced run's entries while the new one has not yet written a checkpoint
ENTRIES = ("config.yaml", "checkpoints", "final", "metrics.jsonl", "summary.json", "loss.png",
           "eval", "tensorboard", "wandb")  # sftlab eval's default --out; train.report_to's local files  # fmt: skip
_MARKS = ("config.yaml", "checkpoints", "final")  # what makes a directory look like a run


def _is_legacy_run(run_dir: Path) -> bool:
    try:
        load_config(run_dir / "config.yaml", migrate=True)
    except Exception:
        return False
    return (run_dir / "final" / "sftlab.json").is_file() or any(
        (run_dir / "checkpoints").glob(f"step-*/{STATE_FILE}")
    )


def owned_entries(run_dir: Path) -> list[str] | None:
    """The entries sftlab wrote in `run_dir`, or None when it is not an sftlab run."""
    manifest = run_dir / MANIFEST
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["entries"]
            if not isinstance(entries, list):
                raise TypeError(f"entries is a {type(entries).__name__}, not a list")
        except (ValueError, KeyError, TypeError) as e:
            raise RunDirError(
                f"{manifest}: unreadable run manifest ({e}); remove the directory by hand"
            ) from e
        return [e for e in entries if e in ENTRIES]  # never a path outside the run's own layout
    if (run_dir / "config.yaml").is_file() and _is_legacy_run(run_dir):
        return list(ENTRIES)
    return None


def check_writable(run_dir: Path, key: str = "train.output_dir") -> None:
    """A run directory sftlab cannot write into (read-only, someone else's permissions) fails now, before data and
    model load, not as a PermissionError at the first write. Probes with a file it removes at once; a directory
    that does not exist yet is probed in its nearest existing parent."""
    target = run_dir
    while not target.exists() and target.parent != target:
        target = target.parent
    if not target.is_dir():
        raise RunDirError(f"{key}: {run_dir}: {target} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sftlab-write-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if target == run_dir else f" (it would be created in {target})"
        raise RunDirError(
            f"{key}: {run_dir}: not writable{where}: {e.strerror or e}; choose a directory you can "
            "write to, or fix its permissions"
        ) from None


def config_changes(run_dir: Path, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, `cfg`'s value) where the run in `run_dir` was started with another config; empty
    when it holds none or one equal to `cfg` (a pipeline stage or self-training round may only resume its own)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    have = yaml.safe_load(saved.read_text()) or {}
    try:  # read as this version reads it: a key added since (at its default) is no change
        have = yaml.safe_load(dump_config(load_config(saved, migrate=True))) or {}
    except SftlabError:
        pass  # a saved config this version refuses: compare it as written
    return sorted(_differences(have, yaml.safe_load(dump_config(cfg)) or {}))


def describe_changes(diff: list[tuple[str, Any, Any]], limit: int = 4) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:limit]) + (
        " ..." if len(diff) > limit else ""
    )


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def check_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Refuse a directory sftlab must not or cannot train into; writes nothing (a probe file aside)."""
    run_dir = Path(cfg.train.output_dir)
    check_writable(run_dir)
    present = [n for n in _MARKS if (run_dir / n).exists()]
    if not present:
        return run_dir
    if owned_entries(run_dir) is None:
        raise FileExistsError(
            f"{run_dir} is not an sftlab run (it holds {', '.join(present)} but no {MANIFEST}); "
            "sftlab will not write or delete there: choose another train.output_dir"
        )
    has_run = (run_dir / "checkpoints").exists() or (run_dir / "final").exists()
    if has_run and not resume and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over"
        )
    return run_dir


def _write_manifest(run_dir: Path) -> None:
    tmp = run_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"entries": list(ENTRIES)}, indent=2))
    os.replace(tmp, run_dir / MANIFEST)


def _move_aside(run_dir: Path) -> Path | None:
    aside = run_dir / ASIDE
    shutil.rmtree(aside, ignore_errors=True)  # left by a crash; the run it holds was already replaced
    names = [n for n in (owned_entries(run_dir) or []) if (run_dir / n).exists()]
    if not names:
        return None
    aside.mkdir()
    for n in names:
        os.replace(run_dir / n, aside / n)
    return aside


def _restore(run_dir: Path, aside: Path) -> None:
    for n in ENTRIES:
        p = run_dir / n
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for p in aside.iterdir():
        os.replace(p, run_dir / p.name)
    aside.rmdir()


@contextmanager
def started_run(cfg: RunConfig, resume: bool, overwrite: bool, log=print) -> Iterator[Path]:
    """Mark the run directory and write config.yaml; with `overwrite`, the old run's entries wait in
    .previous-run/ and come back if the body ends (an error, a divergence) before the new run wrote a checkpoint
    or final/; once it has, they are deleted."""
    run_dir = check_run_dir(cfg, resume, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if resume and saved.is_file() and saved.read_text() != dump_config(cfg):
        log(f"warning: config differs from the one {run_dir} started with; resuming with the new one")
    aside = _move_aside(run_dir) if overwrite and not resume else None
    try:
        _write_manifest(run_dir)
        save_config(cfg, saved)
        yield run_dir
    finally:
        if aside is not None:
            if list_checkpoints(run_dir / "checkpoints") or (run_dir / "final").exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                _restore(run_dir, aside)
                log(f"the new run wrote no checkpoint; the previous run in {run_dir} is kept")
